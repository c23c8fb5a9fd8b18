"""Which label-free importance, measured: the Fisher estimator's batch size, image count and domain.

On the ResNet-18 teacher of ``bench/peers.py`` (trained there on all 60,000 Fashion-MNIST
images; run that first, or pass ``--weights``), every Conv/Linear weight at 2 bits, one
codebook per tensor and one per output channel, no retraining, all 10,000 test images:
accuracy and the time of the importance pass for each estimator setting. Rows are appended to
``OUT/importance.json`` as they come; a rerun skips what is there.

    python bench/importance.py                      # -> bench/results/importance.json
    python bench/importance.py --report bench/results/importance.json   # markdown table on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import labelless  # noqa: E402
from labelless.data import Preprocess, open_images  # noqa: E402
from labelless.evaluate import accuracy, predict  # noqa: E402
from labelless.importance import fisher_importance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "bench/.cache/peers/resnet18-e2-s0-nall.safetensors"
SPEC = labelless.ModelSpec("resnet18", num_classes=10, in_channels=1, image_size=28, mean=(0.2860,), std=(0.3530,))
# (source, batch size, images): the default, per-image gradients, bigger batches, fewer/more images, another domain
SETTINGS = [("none", 0, 0), ("fashion-mnist", 8, 512), ("fashion-mnist", 1, 512), ("mnist", 8, 512),
            ("fashion-mnist", 8, 2048)]
BITS = (2,)
GRANULARITIES = ("per_tensor", "per_channel")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(TEACHER))
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench/results"))
    parser.add_argument("--report", default=None, help="print the markdown table of this importance.json")
    args = parser.parse_args()
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return 0
    path = Path(args.out) / "importance.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    teacher = labelless.load_weights(labelless.build_model(SPEC), args.weights).eval()
    test = open_images("fashion-mnist", split="test", labeled=True, size=28, channels=1)
    for setting in SETTINGS:
        if not any(tuple(r["setting"]) == setting for r in rows):
            rows += measure(teacher, test, setting)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=2))
    print(render(rows))
    return 0


def measure(teacher, test, setting: tuple[str, int, int]) -> list[dict]:
    """Every (bits, granularity) row of one importance setting."""
    source, batch_size, n_images = setting
    preprocess = Preprocess.for_spec(SPEC)
    importance, seconds = None, 0.0
    if source != "none":
        images = open_images(source, split="train", size=28, channels=1, limit=n_images, seed=1).unlabeled()
        start = time.perf_counter()
        importance = fisher_importance(teacher, images, preprocess, n_images=n_images, batch_size=batch_size)
        seconds = time.perf_counter() - start
    rows = []
    for bits in BITS:
        for granularity in GRANULARITIES:
            model = labelless.quantize(teacher, [{"layers": "*", "weights": 2 ** bits, "granularity": granularity}],
                                       importance=importance)
            logits, labels = predict(model, test, preprocess)
            rows.append({"setting": list(setting), "bits": bits, "granularity": granularity,
                         "accuracy": accuracy(logits, labels), "importance_seconds": seconds,
                         "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")})
    return rows


def render(rows: list[dict]) -> str:
    columns = [(b, g) for b in sorted({r["bits"] for r in rows}) for g in GRANULARITIES]
    lines = ["| importance (source, batch, images) | seconds | " + " | ".join(f"{b} bits {g}" for b, g in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for setting in dict.fromkeys(tuple(r["setting"]) for r in rows):
        mine = {(r["bits"], r["granularity"]): r for r in rows if tuple(r["setting"]) == setting}
        first = next(iter(mine.values()))
        label = "none (plain k-means)" if setting[0] == "none" else f"{setting[0]}, {setting[1]}, {setting[2]}"
        cells = " | ".join(f"{mine[c]['accuracy']:.2f}" if c in mine else "-" for c in columns)
        lines.append(f"| {label} | {first['importance_seconds']:.1f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

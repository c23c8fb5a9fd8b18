"""How long a whole sweep takes: every Conv/Linear layer x every k, on N unlabelled images.

    # the GPU target of the sweep issue: ResNet-50 (32 px), 9 values of k, 10,000 images, <= 60 s
    python bench/sweep.py --model resnet50 --small-input --image-size 32 --images 10000
    # the built-in demo model on this CPU, with the demo's settings
    python bench/sweep.py --model resnet18 --in-channels 1 --image-size 28 --images 256 --clusters 1,2,4,8,16,32

Weights are random (the time does not depend on them). Prints one JSON line and, with
``--out``, writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from machine import describe  # noqa: E402  (bench/machine.py)

import labelless  # noqa: E402
from labelless.data import Preprocess, open_images  # noqa: E402
from labelless.evaluate import resolve_device  # noqa: E402
from labelless.sensitivity import DEFAULT_CLUSTERS, SweepConfig, sweep  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--small-input", action="store_true")
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--clusters", default=",".join(map(str, DEFAULT_CLUSTERS)))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    spec = labelless.ModelSpec(args.model, num_classes=10, in_channels=args.in_channels,
                               small_input=args.small_input, image_size=args.image_size)
    device = resolve_device(args.device)
    model = labelless.build_model(spec).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    data = open_images("fashion-mnist", size=spec.image_size, channels=spec.in_channels, limit=args.images).unlabeled()
    clusters = tuple(int(k) for k in args.clusters.split(","))
    labelless.kmeans1d(torch.randn(100_000), 4)  # compile the k-means kernels outside the timing
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = sweep(model, data, Preprocess.for_spec(spec), config=SweepConfig(clusters=clusters, batch_size=args.batch_size),
                       out_dir=folder, device=device)
        seconds = time.perf_counter() - start
    record = {
        "model": args.model, "image_size": spec.image_size, "images": len(data), "clusters": list(clusters),
        "layers": len({r.layer for r in result.rows}), "rows": len(result.rows), "seconds": round(seconds, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else describe(),
        "torch": torch.__version__, "load_average": os.getloadavg()[0],
    }
    print(json.dumps(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

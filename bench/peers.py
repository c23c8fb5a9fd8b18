"""Peers: labelless against coremltools palettization and torchao, on the same teachers and test images.

Teachers (torchvision ResNet-18 and MobileNetV2, 1-channel 28 px input) are trained with labels
on all 60,000 Fashion-MNIST training images, then every Conv/Linear weight is quantized to
2**n levels (n = 2, 3, 4; biases and BatchNorm stay fp32; no retraining) by

* ``coremltools-ptp``   coremltools ``PostTrainingPalettizer`` (k-means, one LUT per tensor);
* ``coremltools-skm``   coremltools ``SKMPalettizer`` (Fisher-weighted k-means) calibrated on
  512 training images with the cross-entropy against the *teacher's own argmax* (no label);
* ``torchao-intx``      torchao int-n weight-only, asymmetric, one scale/zero-point per output channel;
* ``labelless`` and its ``+fisher(fashion)``, ``+fisher(mnist)`` and ``+per_channel`` variants,

and scored on all 10,000 test images. Then the 2-bit ``labelless+fisher(fashion)+per_channel``
model (the first of RETRAIN_SOURCE that was made) is retrained on 2,000 images, three ways and
over three seeds: label-free on MNIST digits, label-free on Fashion-MNIST with labels withheld,
and with those labels (the conventional baseline).

Every finished row is appended at once to ``OUT/peers.json``; a rerun skips the rows already
there (key: model, method, bits, seed) and retries error rows. Teachers are cached as
safetensors under ``bench/.cache/peers/``.

    pip install -e '.[bench]'                                  # coremltools, torchao
    python bench/peers.py                                      # full run -> bench/results/peers.json
    python bench/peers.py --quick --out /tmp/peers             # CPU smoke test, 1-2 minutes on 2 cores
    python bench/peers.py --report bench/results/peers.json -o docs/PEERS.md

``--quick`` runs MobileNetV2 alone (SKMPalettizer's weighted k-means over ResNet-18's 11M weights
takes a minute by itself on two cores; ``--quick --models resnet18`` works too) on 512 training
images for one epoch, 256 test images, 32 calibration images, 64 retraining images, 2 bits and
one seed: it checks that every row is made, not what the numbers are (its teacher is near chance).

Exit status: 1 if an expected row is missing or holds an error other than an allowed one (a
peer package that cannot be imported, or a labelless variant whose API is not there yet);
every such row still records its exact error text.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib
import inspect
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import labelless  # noqa: E402
from labelless.bncorrect import correct_batchnorm  # noqa: E402
from labelless.data import Preprocess, open_images  # noqa: E402
from labelless.evaluate import accuracy, predict, resolve_device  # noqa: E402
from labelless.models import save_checkpoint  # noqa: E402
from labelless.retrain import CrossEntropy, RetrainConfig, retrain  # noqa: E402
from labelless.selection import MIN_HOLDOUT  # noqa: E402
from labelless.train import TrainConfig, train_classifier  # noqa: E402

log = logging.getLogger("peers")

ROOT = Path(__file__).resolve().parents[1]

FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
IMAGE_SIZE = 28
PEERS = ("coremltools-ptp", "coremltools-skm", "torchao-intx")
LABELLESS = ("labelless", "labelless+fisher(fashion)", "labelless+fisher(mnist)",
             "labelless+fisher(fashion)+per_channel", "labelless+fisher(mnist)+per_channel",
             "labelless+fisher(fashion)+bn", "labelless+fisher(fashion)+per_channel+bn",
             "labelless+fisher(fashion)+bn+fp16", "labelless+fisher(fashion)+per_channel+bn+fp16",
             "labelless+fisher(mnist)+per_channel+fp16",
             "labelless+fisher(fashion)+gptq", "labelless+fisher(fashion)+gptq+bn+fp16",
             "labelless+fisher(fashion)+per_channel+gptq+bn+fp16", "labelless+fisher(mnist)+gptq+fp16")
FP16 = {"codebook_dtype": "float16", "dense_dtype": "float16"}  # "+fp16": codebooks and other tensors stored in fp16
RETRAIN_SOURCE = ("labelless+fisher(fashion)+per_channel", "labelless+fisher(fashion)", "labelless")  # first made at 2 bits
RETRAIN_KINDS = ("retrain:label-free(mnist)", "retrain:label-free(fashion)", "retrain:labelled(fashion)")
EXTRA_KINDS = ("retrain:label-free(mnist)+features",)  # one seed, after every model's main rows
FEATURES = 1.0  # RetrainConfig.features of the "+features" rows
BN_SOURCE = "labelless+fisher(fashion)+per_channel+bn"  # the best 2-bit start at the same bytes
BN_KINDS = tuple("retrain+bn:" + k.split(":", 1)[1] for k in RETRAIN_KINDS + EXTRA_KINDS)  # every seed, from BN_SOURCE
REFINE_KINDS = ("retrain+bn:label-free(mnist)+refine",)  # every seed, from BN_SOURCE: digits pulled toward the teacher
REFINE_STEPS = 50  # RetrainConfig.refine_steps of the "+refine" rows
RETRAIN_BITS = 2
TEACHER_BITS = 32


@dataclass(frozen=True)
class Scale:
    """How much of everything one run uses."""

    teacher_limit: int | None  # Fashion-MNIST training images for the teachers (None: all 60,000)
    test_limit: int | None  # test images (None: all 10,000)
    calibration: int  # images for SKM and labelless' Fisher importance
    retrain_limit: int  # images of each retraining set
    retrain_epochs: int
    seeds: int  # retraining seeds
    bits: tuple[int, ...]
    batch_size: int


FULL = Scale(None, None, 512, 2000, 5, 3, (2, 3, 4), 128)
QUICK = Scale(512, 256, 32, 64, 1, 1, (2,), 32)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _logging()
    if args.report:
        Path(args.output).write_text(render(json.loads(Path(args.report).read_text()), args.note))
        return 0
    scale = _scale(args)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "bench/results")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(scale, out / "peers.json", Path(args.cache), resolve_device(args.device), args.epochs, args.seed,
              args.kmeans_workers, "quick" if args.quick else "full")
    models = args.models or ("mobilenet_v2" if args.quick else "resnet18,mobilenet_v2")
    for name in models.split(","):
        run_model(run, name)
    for name in models.split(","):
        run_extras(run, name)
    for name in models.split(","):
        run_bn_start(run, name)
    problems = check(load_rows(run.path), expected_keys(run, models.split(",")))
    for problem in problems:
        log.error("%s", problem)
    return 1 if problems else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subsets, one epoch, 2 bits: a CPU smoke test")
    parser.add_argument("--models", default=None, help="default resnet18,mobilenet_v2 (mobilenet_v2 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="teacher epochs (default 2, 1 with --quick)")
    parser.add_argument("--bits", default=None, help="comma-separated, default 2,3,4 (2 with --quick)")
    parser.add_argument("--seeds", type=int, default=0, help="retraining seeds (default 3, 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the teachers and the calibration subsets")
    parser.add_argument("--device", default="auto", help="where teachers train and models are scored")
    parser.add_argument("--kmeans-workers", type=int, default=1, help="coremltools' num_kmeans_workers")
    parser.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    parser.add_argument("--cache", default=str(ROOT / "bench/.cache/peers"), help="teachers and .lless files")
    parser.add_argument("--report", default=None, help="render the markdown report from this peers.json")
    parser.add_argument("--note", action="append", default=[],
                        help="with --report: a line about the run (e.g. what else shared the machine), repeatable")
    parser.add_argument("-o", "--output", default="docs/PEERS.md")
    return parser


def _scale(args: argparse.Namespace) -> Scale:
    scale = QUICK if args.quick else FULL
    if args.seeds:
        scale = dataclasses.replace(scale, seeds=args.seeds)
    if args.bits:
        scale = dataclasses.replace(scale, bits=tuple(int(b) for b in args.bits.split(",")))
    args.epochs = args.epochs or (1 if args.quick else 2)
    return scale


def _logging() -> None:
    os.environ.setdefault("COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL", "warning")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    _quiet()


def _quiet() -> None:
    """Peers' INFO chatter off (coremltools sets its loggers up when imported, so call this after)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("coremltools", "torchao", "labelless")):
            logging.getLogger(name).setLevel(logging.WARNING)


# -- one run, one model --------------------------------------------------------------------


@dataclass
class Run:
    """What every model of one run shares."""

    scale: Scale
    path: Path  # peers.json
    cache: Path
    device: torch.device
    epochs: int  # teacher epochs
    seed: int
    kmeans_workers: int
    mode: str  # "quick" or "full"


@dataclass
class Bench:
    """One model's teacher, data and intermediate results."""

    run: Run
    name: str
    spec: labelless.ModelSpec
    teacher: nn.Module  # on run.device
    teacher_cpu: nn.Module
    preprocess: nn.Module  # on run.device
    preprocess_cpu: nn.Module
    test: Any
    importance: dict[str, tuple[Any, float]] = field(default_factory=dict)  # source -> (importance, seconds)

    def accuracy(self, model: nn.Module) -> float:
        model = model.to(self.run.device).eval()
        logits, labels = predict(model, self.test, self.preprocess, device=self.run.device, batch_size=512)
        return accuracy(logits, labels)

    def lless_path(self, method: str, bits: int) -> Path:
        slug = method.replace("+", "_").replace("(", "-").replace(")", "")
        return self.run.cache / "lless" / f"{self.name}-{slug}-{bits}bit.lless"


def run_model(run: Run, name: str) -> None:
    bench = _bench(run, name)
    record(bench, "teacher", TEACHER_BITS, run.seed, partial(_teacher_row, bench))
    for bits in run.scale.bits:
        for method in PEERS + LABELLESS:
            record(bench, method, bits, run.seed, partial(METHODS[method], bench, bits))
    source = _retrain_source(bench)
    for kind in RETRAIN_KINDS:
        for seed in range(run.scale.seeds):
            record(bench, kind, RETRAIN_BITS, seed, partial(_retrain_row, bench, kind, seed, source))


def run_extras(run: Run, name: str) -> None:
    bench = _bench(run, name)
    for kind in EXTRA_KINDS:
        record(bench, kind, RETRAIN_BITS, run.seed, partial(_retrain_row, bench, kind, run.seed, _retrain_source(bench)))


def run_bn_start(run: Run, name: str) -> None:
    """The same retrainings (and feature matching, every seed) from the BatchNorm-corrected 2-bit model."""
    bench = _bench(run, name)
    made = bench.lless_path(BN_SOURCE, RETRAIN_BITS).is_file()
    source = BN_SOURCE if made else None
    for kind in BN_KINDS:
        for seed in range(run.scale.seeds):
            record(bench, kind, RETRAIN_BITS, seed, partial(_retrain_row, bench, kind, seed, source))
    for kind in REFINE_KINDS:  # last: the slowest rows (the teacher's forward and backward per image and step)
        for seed in range(run.scale.seeds):
            record(bench, kind, RETRAIN_BITS, seed, partial(_retrain_row, bench, kind, seed, source))


def _bench(run: Run, name: str) -> Bench:
    spec = labelless.ModelSpec(name, num_classes=10, in_channels=1, image_size=IMAGE_SIZE, mean=FASHION_MEAN,
                               std=FASHION_STD)
    preprocess_cpu = Preprocess.for_spec(spec)
    teacher = _cached_teacher(run, spec, copy.deepcopy(preprocess_cpu).to(run.device))
    return Bench(run, name, spec, teacher, copy.deepcopy(teacher).cpu().eval(),
                 copy.deepcopy(preprocess_cpu).to(run.device), preprocess_cpu, _open("fashion-mnist", True,
                                                                                   run.scale.test_limit, "test"))


def _open(spec: str, labeled: bool, limit: int | None, split: str = "train", seed: int = 0):
    return open_images(spec, split=split, labeled=labeled, size=IMAGE_SIZE, channels=1, limit=limit, seed=seed)


def _cached_teacher(run: Run, spec: labelless.ModelSpec, preprocess: nn.Module) -> nn.Module:
    """Train the teacher with labels, or load the one trained with the same settings."""
    limit = run.scale.teacher_limit
    path = run.cache / f"{spec.name}-e{run.epochs}-s{run.seed}-n{limit or 'all'}.safetensors"
    torch.manual_seed(run.seed)  # the initial weights too: the teacher is reproducible from its seed
    model = labelless.build_model(spec)
    if path.is_file():
        log.info("%s: teacher from %s", spec.name, path)
        return labelless.load_weights(model, path).to(run.device).eval()
    config = TrainConfig(epochs=run.epochs, batch_size=run.scale.batch_size, seed=run.seed)
    stats = train_classifier(model.to(run.device), _open("fashion-mnist", True, limit, seed=run.seed), preprocess,
                             config=config, device=run.device)
    log.info("%s: teacher trained in %.0f s", spec.name, stats["seconds"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path, spec)
    return model.eval()


def _teacher_row(bench: Bench) -> dict:
    run = bench.run
    return {"accuracy": bench.accuracy(bench.teacher), "bytes": fp32_bytes(bench.teacher_cpu),
            "payload_bytes": fp32_bytes(bench.teacher_cpu), "seconds": 0.0, "epochs": run.epochs,
            "train_images": run.scale.teacher_limit or 60000,
            "notes": f"fp32, trained with labels: TrainConfig(epochs={run.epochs}, batch_size="
                     f"{run.scale.batch_size}, seed={run.seed})"}


# -- rows: record, resume, check -----------------------------------------------------------


class MissingAPI(Exception):
    """A labelless variant whose API is not (yet) in this checkout."""


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def row_key(row: dict) -> tuple:
    return row["model"], row["method"], row["bits"], row["seed"]


def record(bench: Bench, method: str, bits: int, seed: int, make: Callable[[], dict]) -> None:
    """Make the row unless a finished one is there; an exception becomes an error row."""
    key = (bench.name, method, bits, seed)
    rows = load_rows(bench.run.path)
    if any(row_key(r) == key and "error" not in r for r in rows):
        log.info("skip %s (done)", key)
        return
    start = time.perf_counter()
    try:
        row = make()
    except Exception as exc:  # noqa: BLE001 - one failing peer must not end the run
        row = _error_row(exc, method)
        log.warning("%s: %s", key, row["error"])
    row = {"model": bench.name, "method": method, "bits": bits, "seed": seed, **row,
           "row_seconds": time.perf_counter() - start, **_context(bench)}
    rows = [r for r in load_rows(bench.run.path) if row_key(r) != key] + [row]
    _write(bench.run.path, rows)
    log.info("row %s: %s", key, row.get("error") or f"{row['accuracy']:.2f}% / {row['bytes']} bytes")


def _error_row(exc: Exception, method: str) -> dict:
    row = {"error": f"{type(exc).__name__}: {exc}"}
    if isinstance(exc, MissingAPI):
        row["allowed"] = "labelless API not there yet"
    elif isinstance(exc, ImportError) and method in PEERS:
        row["allowed"] = "peer package cannot be imported"
    return row


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, path)


def _context(bench: Bench) -> dict:
    return {"mode": bench.run.mode, "test_images": len(bench.test), "machine": machine(bench.run.device),
            "versions": versions(), "date": datetime.date.today().isoformat()}


def expected_keys(run: Run, models: list[str]) -> list[tuple]:
    keys = []
    for name in models:
        keys.append((name, "teacher", TEACHER_BITS, run.seed))
        keys += [(name, m, b, run.seed) for b in run.scale.bits for m in PEERS + LABELLESS]
        keys += [(name, k, RETRAIN_BITS, s) for k in RETRAIN_KINDS for s in range(run.scale.seeds)]
        keys += [(name, k, RETRAIN_BITS, run.seed) for k in EXTRA_KINDS]
        keys += [(name, k, RETRAIN_BITS, s) for k in BN_KINDS for s in range(run.scale.seeds)]
        keys += [(name, k, RETRAIN_BITS, s) for k in REFINE_KINDS for s in range(run.scale.seeds)]
    return keys


def check(rows: list[dict], keys: list[tuple]) -> list[str]:
    """What is wrong with the rows: a key without a row, or a row with an error that is not allowed."""
    by_key = {row_key(r): r for r in rows}
    problems = []
    for key in keys:
        row = by_key.get(key)
        if row is None:
            problems.append(f"missing row {key}")
        elif "error" in row and "allowed" not in row:
            problems.append(f"row {key} failed: {row['error']}")
        elif "error" not in row and not (0 <= row["accuracy"] <= 100 and row["bytes"] > 0):
            problems.append(f"row {key} has accuracy {row['accuracy']} and {row['bytes']} bytes")
    return problems


# -- payload bytes, the same for every method ------------------------------------------------


def payload_bytes(reference: nn.Module, packed: dict[str, tuple[int, int]]) -> int:
    """Bytes of a model stored as: for each quantized tensor ``ceil(numel * bits / 8)`` packed
    indices plus its side data (codebook, or scales and zero-points) at their stored dtype; every
    other tensor of ``reference``'s state_dict (BatchNorm buffers included) at fp32.

    ``packed``: state_dict key -> (bits per weight, side-data bytes).
    """
    total = 0
    for key, tensor in reference.state_dict().items():
        if key in packed:
            bits, side = packed[key]
            total += math.ceil(tensor.numel() * bits / 8) + side
        else:
            total += tensor.numel() * 4
    return total


def fp32_bytes(model: nn.Module) -> int:
    return payload_bytes(model, {})


def weight_keys(model: nn.Module) -> list[str]:
    """state_dict keys of every Conv/Linear weight: what every method must quantize."""
    return [f"{fqn}.weight" for fqn, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _result(bench: Bench, model: nn.Module, packed: dict, seconds: float, notes: str, **extra) -> dict:
    """A finished quantization row; weights a method left unquantized are listed (and cost fp32)."""
    payload = payload_bytes(bench.teacher_cpu, packed)
    unquantized = [k for k in weight_keys(bench.teacher_cpu) if k not in packed]
    return {"accuracy": bench.accuracy(model), "bytes": extra.pop("bytes", payload), "payload_bytes": payload,
            "fp32_bytes": fp32_bytes(bench.teacher_cpu), "seconds": seconds, "unquantized": unquantized,
            "notes": notes, **extra}


# -- coremltools ---------------------------------------------------------------------------


def coreml_ptp(bench: Bench, bits: int) -> dict:
    from coremltools.optimize.torch.palettization import (
        ModulePostTrainingPalettizerConfig,
        PostTrainingPalettizer,
        PostTrainingPalettizerConfig,
    )

    _quiet()
    config = PostTrainingPalettizerConfig(
        global_config=ModulePostTrainingPalettizerConfig(n_bits=bits, granularity="per_tensor"))
    start = time.perf_counter()
    model = PostTrainingPalettizer(copy.deepcopy(bench.teacher_cpu), config).compress(
        num_kmeans_workers=bench.run.kmeans_workers)
    seconds = time.perf_counter() - start
    notes = (f"PostTrainingPalettizer(PostTrainingPalettizerConfig(global_config=ModulePostTrainingPalettizerConfig("
             f"n_bits={bits}, granularity='per_tensor'))).compress(num_kmeans_workers={bench.run.kmeans_workers}); "
             f"other options at their defaults (fp32 LUT, enable_fast_kmeans_mode=True)")
    return _result(bench, model, _coreml_packed(model, bits), seconds, notes)


def coreml_skm(bench: Bench, bits: int) -> dict:
    from coremltools.optimize.torch.palettization import ModuleSKMPalettizerConfig, SKMPalettizer, SKMPalettizerConfig

    _quiet()
    n = bench.run.scale.calibration
    data = _teacher_labelled_samples(bench, n)
    config = SKMPalettizerConfig(global_config=ModuleSKMPalettizerConfig(n_bits=bits, granularity="per_tensor"),
                                 calibration_nsamples=n)
    start = time.perf_counter()
    model = SKMPalettizer(copy.deepcopy(bench.teacher_cpu), config).compress(
        dataloader=data, loss_fn=_pseudo_label_loss, num_kmeans_workers=bench.run.kmeans_workers)
    seconds = time.perf_counter() - start
    notes = (f"SKMPalettizer(SKMPalettizerConfig(global_config=ModuleSKMPalettizerConfig(n_bits={bits}, "
             f"granularity='per_tensor'), calibration_nsamples={n})).compress(dataloader, loss_fn); calibration: "
             f"{n} unlabelled Fashion-MNIST train images, one per sample (per-sample squared gradients); loss: "
             f"cross-entropy against the teacher's own argmax predictions (no labels); time includes the sensitivity")
    return _result(bench, model.cpu(), _coreml_packed(model, bits), seconds, notes, calibration_images=n)


def _teacher_labelled_samples(bench: Bench, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` calibration images, one per item, each with the teacher's argmax as its target."""
    images = _open("fashion-mnist", False, n, seed=bench.run.seed).images
    x = bench.preprocess_cpu(images)  # (n, 1, 28, 28) float
    with torch.no_grad():
        targets = torch.cat([bench.teacher_cpu(part).argmax(1) for part in x.split(256)])
    return [(x[i:i + 1], targets[i:i + 1]) for i in range(n)]


def _pseudo_label_loss(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device  # SKMPalettizer moves the model to CUDA when there is one
    x, target = data
    return F.cross_entropy(model(x.to(device)), target.to(device))


def _coreml_packed(model: nn.Module, bits: int) -> dict[str, tuple[int, int]]:
    """Palettized weights (those coremltools gave a LUT): n-bit indices plus the LUT as stored."""
    buffers = dict(model.named_buffers())
    packed = {}
    for fqn, module in model.named_modules():
        lut = buffers.get(f"{fqn}._COREML_/weight/lut")
        if lut is not None and isinstance(module, (nn.Conv2d, nn.Linear)):
            levels = module.weight.detach().unique().numel()
            if levels > lut.numel() or lut.numel() > 2 ** bits:
                raise RuntimeError(f"{fqn}.weight has {levels} values for a LUT of {lut.numel()}")
            packed[f"{fqn}.weight"] = (bits, lut.numel() * lut.element_size())
    return packed


# -- torchao -------------------------------------------------------------------------------


def torchao_intx(bench: Bench, bits: int) -> dict:
    from torchao.quantization import IntxUnpackedToInt8Tensor, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_primitives import MappingType

    dtype = getattr(torch, f"int{bits}")
    model = copy.deepcopy(bench.teacher_cpu)
    start = time.perf_counter()
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0),
                                          mapping_type=MappingType.ASYMMETRIC))  # nn.Linear (its default filter)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        weight = conv.weight.detach()  # (C_out, C_in/groups, kh, kw): one block per output channel
        quantized = IntxUnpackedToInt8Tensor.from_hp(weight, (1, *weight.shape[1:]), dtype,
                                                     mapping_type=MappingType.ASYMMETRIC)
        conv.weight = nn.Parameter(quantized, requires_grad=False)
    seconds = time.perf_counter() - start
    packed, probe = _torchao_packed(model, bits), _intx_config_on_convs(bench.teacher_cpu, dtype)
    notes = (f"Linear: quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, granularity=PerAxis(0), "
             f"mapping_type=MappingType.ASYMMETRIC)); Conv2d: IntxUnpackedToInt8Tensor.from_hp(weight, "
             f"block_size=(1, C_in/groups, kh, kw), torch.int{bits}, mapping_type=ASYMMETRIC), i.e. the same "
             f"per-output-channel qparams that IntxWeightOnlyConfig gives Linear (on Conv2d it does not: see "
             f"intx_config_on_conv); fp32 scales, int8 zero-points; scored with the dequantized weights")
    return _result(bench, _dequantized(model), packed, seconds, notes, intx_config_on_conv=probe)


def _intx_config_on_convs(teacher: nn.Module, dtype: torch.dtype) -> dict[str, str]:
    """What IntxWeightOnlyConfig(PerAxis(0)) itself does to each kind of conv: its scales' shape, or its error."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_primitives import MappingType

    config = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0), mapping_type=MappingType.ASYMMETRIC)
    kinds = {}
    for fqn, conv in teacher.named_modules():
        if isinstance(conv, nn.Conv2d):
            kind = ("depthwise" if conv.groups > 1 else "1 input channel" if conv.in_channels == 1
                    else "dense 1x1" if conv.weight[0, 0].numel() == 1 else "dense kxk")
            kinds.setdefault(kind, (fqn, conv))
    found = {}
    for kind, (fqn, conv) in kinds.items():
        probe = nn.Sequential(copy.deepcopy(conv))
        try:
            quantize_(probe, config, filter_fn=lambda m, _: isinstance(m, nn.Conv2d))
            found[kind] = f"{fqn}: weight {list(conv.weight.shape)} -> scale {list(probe[0].weight.scale.shape)}"
        except Exception as exc:  # noqa: BLE001 - the error is the finding
            found[kind] = f"{fqn}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return found


def _torchao_packed(model: nn.Module, bits: int) -> dict[str, tuple[int, int]]:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    packed = {}
    for fqn, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and hasattr(weight, "qdata"):
            if weight.qdata.min() < low or weight.qdata.max() > high:
                raise RuntimeError(f"{fqn}.weight has integers outside [{low}, {high}]")
            side = weight.scale.numel() * weight.scale.element_size() + \
                weight.zero_point.numel() * weight.zero_point.element_size()
            packed[f"{fqn}.weight"] = (bits, side)
    return packed


def _dequantized(model: nn.Module) -> nn.Module:
    """The same model with plain fp32 weights (what a weight-only kernel computes with)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is not None and hasattr(weight, "dequantize") and hasattr(weight, "qdata"):
            module.weight = nn.Parameter(weight.dequantize().detach().clone(), requires_grad=False)
    return model


# -- labelless -----------------------------------------------------------------------------


def labelless_variant(bench: Bench, bits: int, method: str) -> dict:
    source = "fashion" if "fisher(fashion)" in method else "mnist" if "fisher(mnist)" in method else None
    rule: dict[str, Any] = {"layers": "*", "weights": 2 ** bits}
    if "+per_channel" in method:
        rule["granularity"] = "per_channel"
    storage = FP16 if method.endswith("+fp16") else {}
    _require_api(source is not None, "granularity" in rule)
    importance, importance_seconds = _importance(bench, source) if source else (None, 0.0)
    kwargs = {} if importance is None else {"importance": importance}
    start = time.perf_counter()
    model = labelless.quantize(bench.teacher_cpu, [rule], **kwargs)
    if "+gptq" in method:  # indices re-chosen against each layer's output error, on the same images
        _compensate()(model, bench.teacher_cpu, _images(bench, source), bench.preprocess_cpu,
                      n_images=bench.run.scale.calibration, seed=bench.run.seed)
    if "+bn" in method:  # BatchNorm statistics corrected on the importance's own unlabelled images
        correct_batchnorm(model, bench.teacher_cpu, _images(bench, source), bench.preprocess_cpu,
                          n_images=bench.run.scale.calibration, seed=bench.run.seed)
    seconds = time.perf_counter() - start + importance_seconds
    bench.lless_path(method, bits).parent.mkdir(parents=True, exist_ok=True)
    report = labelless.save(model, bench.lless_path(method, bits), **storage)
    if storage:  # scored as the file loads back: its fp16 tensors rounded
        model = labelless.load(bench.lless_path(method, bits))
    notes = (f"labelless.quantize(teacher, [{rule}]{', importance=imp' if kwargs else ''}); labelless.save "
             f"(bit-packed{', codebooks and other tensors in fp16, scored as loaded back' if storage else ''})")
    if "+gptq" in method:
        notes += "; then compensate(model, teacher, <the same images>, preprocess) (GPTQ over the codebooks)"
    if "+bn" in method:
        notes += "; then correct_batchnorm(model, teacher, <the same images>, preprocess)"
    if source:
        notes += (f"; imp = fisher_importance(teacher, <{bench.run.scale.calibration} unlabelled "
                  f"{'Fashion-MNIST train' if source == 'fashion' else 'MNIST'} images>, preprocess, "
                  f"n_images={bench.run.scale.calibration}, seed={bench.run.seed}); time includes it")
    return _result(bench, model, _labelless_packed(model), seconds, notes, bytes=report["total_bytes"],
                   file=str(bench.lless_path(method, bits)), importance_seconds=importance_seconds,
                   calibration_images=bench.run.scale.calibration if source else None)


def _compensate() -> Callable:
    try:
        from labelless.compensate import compensate
    except ImportError as exc:
        raise MissingAPI(f"from labelless.compensate import compensate: {exc}") from None
    return compensate


def _require_api(fisher: bool, per_channel: bool) -> None:
    """Raise MissingAPI where this checkout lacks what the variant needs."""
    if fisher:
        try:
            from labelless.importance import fisher_importance  # noqa: F401
        except ImportError as exc:
            raise MissingAPI(f"from labelless.importance import fisher_importance: {exc}") from None
        if "importance" not in inspect.signature(labelless.quantize).parameters:
            raise MissingAPI("labelless.quantize takes no importance= argument")
    if per_channel:
        try:
            labelless.load_plan([{"layers": "*", "weights": 4, "granularity": "per_channel"}])
        except labelless.PlanError as exc:
            raise MissingAPI(f"plan rules take no granularity: {exc}") from None


def _importance(bench: Bench, source: str) -> tuple[Any, float]:
    """Fisher importance from unlabelled images of ``source``, computed once per model."""
    if source not in bench.importance:
        from labelless.importance import fisher_importance

        n = bench.run.scale.calibration
        start = time.perf_counter()
        importance = fisher_importance(bench.teacher_cpu, _images(bench, source), bench.preprocess_cpu, n_images=n,
                                       seed=bench.run.seed)
        bench.importance[source] = (importance, time.perf_counter() - start)
    return bench.importance[source]


def _images(bench: Bench, source: str):
    """The unlabelled calibration images of ``source`` (fashion or mnist)."""
    images = _open("fashion-mnist" if source == "fashion" else "mnist", False, bench.run.scale.calibration,
                   seed=bench.run.seed)
    return images.unlabeled()


def _labelless_packed(model: nn.Module) -> dict[str, tuple[int, int]]:
    packed = {}
    for key, qt in labelless.quantized_tensors(model).items():
        bits = max(1, (int(qt.n_clusters) - 1).bit_length())
        packed[key] = (bits, qt.centroids.numel() * qt.centroids.element_size())
    return packed


METHODS: dict[str, Callable[[Bench, int], dict]] = {
    "coremltools-ptp": coreml_ptp,
    "coremltools-skm": coreml_skm,
    "torchao-intx": torchao_intx,
    **{m: (lambda bench, bits, m=m: labelless_variant(bench, bits, m)) for m in LABELLESS},
}


# -- retraining ----------------------------------------------------------------------------


def _retrain_source(bench: Bench) -> str | None:
    """The first of RETRAIN_SOURCE whose 2-bit model was made (its row finished, its file there)."""
    done = {row_key(r) for r in load_rows(bench.run.path) if "error" not in r}
    for method in RETRAIN_SOURCE:
        made = bench.lless_path(method, RETRAIN_BITS).is_file()
        if made and (bench.name, method, RETRAIN_BITS, bench.run.seed) in done:
            return method
    return None


def _retrain_row(bench: Bench, kind: str, seed: int, source: str | None) -> dict:
    if source is None:
        raise RuntimeError(f"no 2-bit model of {' or '.join(RETRAIN_SOURCE + (BN_SOURCE,))} to retrain")
    how = kind.split(":", 1)[1]
    scale, path = bench.run.scale, bench.lless_path(source, RETRAIN_BITS)
    student = labelless.load(path)
    features = FEATURES if kind.endswith("+features") else 0.0
    refine = REFINE_STEPS if kind.endswith("+refine") else 0
    config = RetrainConfig(epochs=scale.retrain_epochs, batch_size=scale.batch_size, seed=seed, features=features,
                           refine_steps=refine, min_holdout=min(MIN_HOLDOUT, scale.retrain_limit // 10))  # quick: 6 held out
    go = dict(config=config, device=bench.run.device)
    fashion = _open("fashion-mnist", True, scale.retrain_limit, seed=bench.run.seed)
    if how.startswith("label-free(mnist)"):
        result = retrain(student, bench.teacher, _open("mnist", False, scale.retrain_limit).unlabeled(),
                         bench.preprocess, **go)
    elif how == "label-free(fashion)":
        result = retrain(student, bench.teacher, fashion.unlabeled(), bench.preprocess, **go)
    else:
        result = retrain(student, CrossEntropy(), fashion, bench.preprocess, **go)
    notes = (f"retrain(labelless.load({path.name}), {'CrossEntropy()' if how.startswith('labelled') else 'teacher'}, ..., "
             f"RetrainConfig(epochs={config.epochs}, batch_size={config.batch_size}, seed={seed}, "
             f"features={features}, refine_steps={refine}), other fields "
             f"default) on {scale.retrain_limit} images")
    return {"accuracy": bench.accuracy(result.model), "bytes": path.stat().st_size, "source": source,
            "seconds": result.seconds, "best_epoch": result.best_epoch, "train_images": scale.retrain_limit,
            "epochs": config.epochs, "notes": notes}


# -- machine and versions ------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    return text + (f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "; no GPU used")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "labelless": labelless.__version__}
    for name in ("coremltools", "torchao"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not raised
            found[name] = f"not importable ({type(exc).__name__}: {exc})"
    return found


# -- the markdown report -------------------------------------------------------------------


def render(rows: list[dict], notes: list[str] = ()) -> str:
    """docs/PEERS.md from ``peers.json`` rows (and lines about the run)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["# labelless against coremltools and torchao", "", *_header(rows), ""]
    for note in notes:
        lines += [f"> {note}", ""]
    lines += _teacher_table(rows, models)
    for name in models:
        lines += _model_table([r for r in rows if r["model"] == name], name, _cell)
        lines += _model_table([r for r in rows if r["model"] == name], name, _seconds_cell)
    lines += _retrain_table(rows, models)
    lines += _targets(rows, models)
    lines += _errors(rows) + _notes(rows)
    return "\n".join(lines) + "\n"


def _header(rows: list[dict]) -> list[str]:
    first = rows[0] if rows else {}
    v = first.get("versions", {})
    machines = ", ".join(dict.fromkeys(r.get("machine", "?") for r in rows))
    dates = sorted({r.get("date", "?") for r in rows})
    modes = ", ".join(sorted({r.get("mode", "?") for r in rows}))
    return [f"Machine: {machines}.  ", f"Date: {dates[0]}{f' to {dates[-1]}' if len(dates) > 1 else ''} "
            f"({modes} run, {first.get('test_images', '?')} test images).  ",
            f"Versions: torch {v.get('torch')}, coremltools {v.get('coremltools')}, torchao {v.get('torchao')}, "
            f"labelless {v.get('labelless')}, Python {v.get('python')}."]


def _teacher_table(rows: list[dict], models: list[str]) -> list[str]:
    lines = ["## Teachers (fp32, trained with labels)", "", "| model | epochs | train images | accuracy % | bytes |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["method"] == "teacher" and "error" not in r:
            lines.append(f"| {r['model']} | {r['epochs']} | {r['train_images']:,} | {r['accuracy']:.2f} | "
                         f"{r['bytes']:,} |")
    return lines + [""]


def _model_table(rows: list[dict], name: str, cell: Callable[[dict | None], str]) -> list[str]:
    bits = sorted({r["bits"] for r in rows if r["method"] in METHODS})
    title = "accuracy % / bytes, no retraining" if cell is _cell else "seconds of the quantization itself"
    lines = [f"## {name}: {title}", "",
             "| method | " + " | ".join(f"{b} bits ({2 ** b} levels)" for b in bits) + " |",
             "|---|" + "---:|" * len(bits)]
    cells = {(r["method"], r["bits"]): r for r in rows}
    for method in METHODS:
        if any((method, b) in cells for b in bits):
            lines.append(f"| {method} | " + " | ".join(cell(cells.get((method, b))) for b in bits) + " |")
    return lines + [""]


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "error (see below)"
    payload = row.get("payload_bytes")
    formula = f" (payload {payload:,})" if payload and payload != row["bytes"] else ""
    return f"{row['accuracy']:.2f} / {row['bytes']:,}{formula}"


def _seconds_cell(row: dict | None) -> str:
    return "-" if row is None or "error" in row else f"{row['seconds']:.1f}"


def _retrain_table(rows: list[dict], models: list[str]) -> list[str]:
    lines = [f"## Retraining the {RETRAIN_BITS}-bit model (mean ± population std over seeds)", "",
             "| model | retraining | from | seeds | accuracy % | runs |", "|---|---|---|---:|---:|---|"]
    for name in models:
        for kind in RETRAIN_KINDS + EXTRA_KINDS + BN_KINDS + REFINE_KINDS:
            done = [r for r in rows if r["model"] == name and r["method"] == kind and "error" not in r]
            if done:
                values = [r["accuracy"] for r in done]
                spread = statistics.pstdev(values) if len(values) > 1 else 0.0
                runs = ", ".join(f"{v:.2f}" for v in values)
                lines.append(f"| {name} | {kind.split(':', 1)[1]} | {done[0]['source']} | {len(values)} | "
                             f"{statistics.fmean(values):.2f} ± {spread:.2f} | {runs} |")
    return lines + [""]


def _targets(rows: list[dict], models: list[str]) -> list[str]:
    """Issue 12's targets, each checked against the rows: met or missed, by how much."""
    lines = ["## Against the targets", ""]
    for name in models:
        mine = [r for r in rows if r["model"] == name and "error" not in r]
        lines += [f"### {name}", ""] + _quantizer_targets(mine) + _retrain_targets(mine) + [""]
    return lines


def _best(rows: list[dict], methods: tuple[str, ...], bits: int) -> dict | None:
    found = [r for r in rows if r["method"] in methods and r["bits"] == bits]
    return max(found, key=lambda r: (r["accuracy"], -r["bytes"])) if found else None


def _quantizer_targets(rows: list[dict]) -> list[str]:
    lines = []
    in_domain = tuple(m for m in LABELLESS if "mnist" not in m)
    for bits in sorted({r["bits"] for r in rows if r["method"] in PEERS}):
        peer, ours = _best(rows, PEERS, bits), _best(rows, in_domain, bits)
        if peer is None or ours is None:
            continue
        budget = peer.get("payload_bytes") or peer["bytes"]
        fits = [r for r in rows if r["method"] in in_domain and r["bits"] == bits and r["bytes"] <= budget]
        fit = max(fits, key=lambda r: r["accuracy"]) if fits else None
        verdict = "met" if fit and fit["accuracy"] >= peer["accuracy"] else "missed"
        lines.append(f"- {bits} bits: best peer {peer['method']} {peer['accuracy']:.2f}% in {budget:,} bytes; best "
                     f"labelless {ours['method']} {ours['accuracy']:.2f}% in {ours['bytes']:,} bytes; best labelless "
                     f"file within the peer's payload: " + (f"{fit['method']} {fit['accuracy']:.2f}% in "
                     f"{fit['bytes']:,} bytes" if fit else "none") + f" -> **{verdict}**")
    lines += _domain_target(rows)
    return lines


def _domain_target(rows: list[dict]) -> list[str]:
    lines = []
    for grain in ("", "+per_channel"):
        fashion = _best(rows, (f"labelless+fisher(fashion){grain}",), 2)
        mnist = _best(rows, (f"labelless+fisher(mnist){grain}",), 2)
        if fashion and mnist:
            gap = fashion["accuracy"] - mnist["accuracy"]
            lines.append(f"- 2 bits, importance from MNIST digits{grain}: {mnist['accuracy']:.2f}% vs "
                         f"{fashion['accuracy']:.2f}% in-domain, {gap:.2f} points (target <= 2) -> "
                         f"**{'met' if gap <= 2 else 'missed'}**")
    return lines


def _retrain_targets(rows: list[dict]) -> list[str]:
    def mean(kind: str) -> float | None:
        values = [r["accuracy"] for r in rows if r["method"] == kind]
        return statistics.fmean(values) if values else None

    lines = []
    for prefix in ("retrain", "retrain+bn"):
        labelled = mean(f"{prefix}:labelled(fashion)")
        for how, limit in (("label-free(mnist)", 1.0), ("label-free(mnist)+features", 1.0),
                           ("label-free(mnist)+refine", 1.0), ("label-free(fashion)", 0.3)):
            value = mean(f"{prefix}:{how}")
            if value is not None and labelled is not None:
                gap = labelled - value
                lines.append(f"- {prefix}, {how}: {value:.2f}% vs labelled {labelled:.2f}% (means), {gap:.2f} points "
                             f"below (target <= {limit}) -> **{'met' if gap <= limit else 'missed'}**")
    return lines


def _errors(rows: list[dict]) -> list[str]:
    failed = [r for r in rows if "error" in r]
    if not failed:
        return []
    lines = ["## Rows that did not run", ""]
    for r in failed:
        allowed = f" ({r['allowed']})" if "allowed" in r else ""
        lines.append(f"- {r['model']} {r['method']} {r['bits']} bits: `{r['error']}`{allowed}")
    return lines + [""]


def _notes(rows: list[dict]) -> list[str]:
    calibration = next((r["calibration_images"] for r in rows if r.get("calibration_images")), "?")
    retrained = next((r for r in rows if r["method"] in RETRAIN_KINDS and "error" not in r), {})
    probe = next((r["intx_config_on_conv"] for r in rows if r.get("intx_config_on_conv")), {})
    probe_text = "; ".join(f"{kind}: `{text}`" for kind, text in probe.items()) or "not run"
    return [
        "## How each method was run", "",
        "- Every method starts from the same fp32 teacher and quantizes every Conv2d/Linear weight to 2**n levels; "
        "biases and BatchNorm stay fp32; no retraining. Accuracy is top-1 on the same test images. Times are the "
        "quantization alone (k-means, calibration, importance), on the CPU (SKMPalettizer "
        "computes its sensitivity on CUDA when there is one).",
        "- **coremltools-ptp**: `coremltools.optimize.torch.palettization.PostTrainingPalettizer` with "
        "`PostTrainingPalettizerConfig(global_config=ModulePostTrainingPalettizerConfig(n_bits=n, "
        "granularity='per_tensor'))`, other options at their defaults (fp32 LUT, `enable_fast_kmeans_mode=True`), "
        "`compress(num_kmeans_workers=1)` unless `--kmeans-workers`.",
        "- **coremltools-skm**: `SKMPalettizer` with `SKMPalettizerConfig(global_config=ModuleSKMPalettizerConfig("
        f"n_bits=n, granularity='per_tensor'), calibration_nsamples={calibration})`: the Fisher sensitivity is the "
        "squared gradient, image by image, of the **cross-entropy against the teacher's own argmax prediction** on "
        f"{calibration} unlabelled Fashion-MNIST training images (no label is read).",
        "- **torchao-intx**: int-n weight-only, asymmetric, one fp32 scale and int8 zero-point per output channel. "
        "Linear: `quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.intN, granularity=PerAxis(0), "
        "mapping_type=MappingType.ASYMMETRIC))`. Conv2d: the same config does not give one scale per output "
        f"channel ({probe_text}), so conv weights are quantized with torchao's own "
        "`IntxUnpackedToInt8Tensor.from_hp(weight, block_size=(1, C_in/groups, kh, kw), torch.intN, "
        "mapping_type=MappingType.ASYMMETRIC)`, the tensor that config builds, with a per-output-channel block. "
        "Scored with the dequantized weights.",
        "- **labelless**: `labelless.quantize(teacher, [{layers: '*', weights: 2**n}])`, one codebook per tensor; "
        f"`+fisher(...)`: `importance=fisher_importance(teacher, images, preprocess, n_images={calibration}, "
        f"seed=0)` on {calibration} unlabelled Fashion-MNIST training images (the same as SKM's) or MNIST digits "
        "(another domain), its time included; `+per_channel`: rules with `granularity: per_channel`, one codebook "
        "per output channel; `+gptq`: then `labelless.compensate.compensate` on the same unlabelled images (each "
        "layer's indices re-chosen, GPTQ-style, so that its output moves least; same codebooks, same bytes); "
        "`+bn`: then `labelless.bncorrect.correct_batchnorm` on the same unlabelled images "
        "(BatchNorm running statistics moved by the shift quantization causes; no label, no training, no byte); "
        "`+fp16`: saved with `codebook_dtype='float16', dense_dtype='float16'` and scored as loaded back.",
        "- **Bytes**: labelless rows give the real `.lless` file size (`labelless.save(...)['total_bytes']`, "
        "bit-packed indices, header included) and, in brackets, the payload by the formula the peers get: "
        "`sum over quantized weights of ceil(numel * n / 8) + their codebook or scales and zero-points at the stored "
        "dtype, plus numel * 4 for every other state_dict tensor (BatchNorm buffers included)`.",
        f"- **Retraining**: `labelless.retrain.retrain` (label-free, KL to the teacher) on "
        f"{retrained.get('train_images', '?')} MNIST digits or as many Fashion-MNIST training images with their "
        "labels withheld, and `retrain(student, CrossEntropy(), ...)` on the same Fashion-MNIST images with their labels; "
        f"`RetrainConfig(epochs={retrained.get('epochs', '?')}, seed=s)`, other fields at their defaults. "
        f"`retrain:` rows start from the first of {', '.join(RETRAIN_SOURCE)} that was made; `retrain+bn:` rows from "
        f"{BN_SOURCE}; `+features`: `features={FEATURES}` (every layer's output matched too); `+refine`: "
        f"`refine_steps={REFINE_STEPS}` (the digits first pulled toward the teacher's BatchNorm statistics; the "
        "held-out split is of the refined images too).",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())

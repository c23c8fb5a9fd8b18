"""``labelless retrain``: win the accuracy back, label-free (or with labels, as the baseline)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..data import Preprocess, open_images
from ..errors import LabellessError
from ..evaluate import accuracy, predict_labeled, resolve_device
from ..fileformat import load, save
from ..io import atomic_write_json, check_output_dir
from ..models import build_model, load_weights
from ..retrain import RetrainConfig, retrain, retrain_labeled
from .common import write_config
from .quantize import add_storage_args, storage_kwargs


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("retrain", help="retrain a .lless model's non-quantized layers without labels")
    parser.add_argument("file", help="the quantized .lless model (the student)")
    parser.add_argument("--weights", required=True, help="the original model's checkpoint (the teacher)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--unlabeled", help="unlabelled images to match the teacher on (label-free)")
    source.add_argument("--labeled", help="labelled images: conventional retraining, the baseline")
    parser.add_argument("--limit", type=int, default=None, help="use this many images only")
    parser.add_argument("--eval", dest="eval_data", default=None, help="labelled test set to report accuracy before/after")
    add_retrain_args(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint-dir", default=None, help="where epoch checkpoints go (default OUT.ckpt/)")
    add_storage_args(parser)
    parser.add_argument("-o", "--output", required=True, help="the retrained .lless file to write")
    parser.set_defaults(run=run)


def add_retrain_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("retraining")
    defaults = RetrainConfig()
    group.add_argument("--epochs", type=int, default=defaults.epochs)
    group.add_argument("--lr", type=float, default=defaults.lr)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--loss", choices=["kl", "mse"], default=defaults.loss)
    group.add_argument("--temperature", type=float, default=defaults.temperature)
    group.add_argument("--bn", choices=["frozen", "update"], default=defaults.bn,
                       help="BatchNorm statistics: keep the original's (safe across domains) or re-estimate")
    group.add_argument("--no-balance", action="store_true", help="do not balance the teacher's predicted classes")
    group.add_argument("--cutmix", type=float, default=defaults.cutmix, help="probability of CutMix per batch (0: off)")
    group.add_argument("--holdout", type=float, default=defaults.holdout)
    group.add_argument("--tune-centroids", action="store_true", help="also learn codebook values (indices fixed)")
    group.add_argument("--seed", type=int, default=defaults.seed)


def retrain_config(args: argparse.Namespace) -> RetrainConfig:
    return RetrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, loss=args.loss,
                         temperature=args.temperature, bn=args.bn, balance=not args.no_balance, cutmix=args.cutmix,
                         holdout=args.holdout, tune_centroids=args.tune_centroids, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.output)
    student = load(args.file)
    spec = getattr(student, "labelless_spec", None)
    if spec is None:
        raise LabellessError(f"{args.file} holds a custom model: retrain it through the Python API")
    teacher = load_weights(build_model(spec), args.weights).eval()
    device = resolve_device(args.device)
    preprocess = Preprocess.for_spec(spec).to(device)
    config = retrain_config(args)
    checkpoints = Path(args.checkpoint_dir or f"{args.output}.ckpt")
    test = _test_set(args, spec)
    before = _accuracy(student, test, preprocess, device)
    if args.unlabeled:
        data = open_images(args.unlabeled, split="train", size=spec.image_size, channels=spec.in_channels,
                           limit=args.limit, seed=args.seed).unlabeled()
        result = retrain(student, teacher, data, preprocess, config=config, checkpoint_dir=checkpoints, device=device)
    else:
        data = open_images(args.labeled, split="train", labeled=True, size=spec.image_size, channels=spec.in_channels,
                           limit=args.limit, seed=args.seed)
        result = retrain_labeled(student, data, preprocess, config=config, checkpoint_dir=checkpoints, device=device)
    after = _accuracy(result.model, test, preprocess, device)
    save(result.model, args.output, **storage_kwargs(args))
    summary = dict(result.summary(), test_accuracy_before=before, test_accuracy_after=after)
    atomic_write_json(f"{args.output}.json", summary)
    write_config(f"{args.output}.config.json", args, retrain=dataclasses.asdict(config))
    _print(result, before, after, args.output)
    return 0


def _test_set(args, spec):
    if not args.eval_data:
        return None
    return open_images(args.eval_data, split="test", labeled=True, size=spec.image_size, channels=spec.in_channels)


def _accuracy(model, test, preprocess, device) -> float | None:
    if test is None:
        return None
    logits, labels = predict_labeled(model.to(device), test, preprocess, device=device)
    return accuracy(logits, labels)


def _print(result, before, after, output) -> None:
    metric = "accuracy" if "accuracy" in result.after else "agreement"
    line = (f"held-out {metric}: {result.before[metric]:.2f}% -> {result.after[metric]:.2f}% "
            f"(best epoch {result.best_epoch}), {result.seconds:.1f} s, {result.images_per_second:.0f} images/s")
    if before is not None:
        line += f"; test accuracy {before:.2f}% -> {after:.2f}%"
    print(f"{line}\nwrote {output}")

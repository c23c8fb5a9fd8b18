"""``labelless retrain``: win the accuracy back, label-free (or with labels, as the baseline).

Under torchrun every rank trains its share (DistributedDataParallel); rank 0 alone measures
the test set and writes the model, its summary and the checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from pathlib import Path

from .. import distributed
from ..config import is_choice
from ..data import Preprocess, open_images
from ..errors import LabellessError
from ..evaluate import accuracy, predict
from ..fileformat import load, save
from ..io import atomic_write_json, check_output_dir
from ..models import build_model, load_weights
from ..retrain import CrossEntropy, RetrainConfig, retrain
from .common import add_custom_arg, add_device_arg, add_skip_unreadable, add_unlabeled_arg, write_config
from .quantize import add_storage_args, storage_kwargs

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("retrain", help="retrain a .lless model's non-quantized layers without labels")
    parser.add_argument("file", help="the quantized .lless model (the student)")
    parser.add_argument("--weights", required=True, help="the original model's checkpoint (the teacher)")
    source = parser.add_mutually_exclusive_group(required=True)
    add_unlabeled_arg(source, help="unlabelled images to match the teacher on (label-free)")
    source.add_argument("--labeled", "--labelled", dest="labeled", metavar="SPEC",
                        help="labelled training images instead: conventional retraining, the baseline")
    parser.add_argument("--limit", type=int, default=None, help="use this many images only")
    add_skip_unreadable(parser)
    parser.add_argument("--eval", dest="eval_data", default=None, metavar="SPEC",
                        help="labelled test set (its test split) to report accuracy before/after")
    add_retrain_args(parser)
    add_device_arg(parser)
    add_custom_arg(parser)
    parser.add_argument("--checkpoint-dir", default=None, help="where epoch checkpoints go (default OUT.ckpt/)")
    add_storage_args(parser)
    parser.add_argument("-o", "--output", required=True, help="the retrained .lless file to write")
    parser.set_defaults(run=run)


def add_retrain_args(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`RetrainConfig` field, its default and help taken from the field."""
    group = parser.add_argument_group("retraining")
    hints = typing.get_type_hints(RetrainConfig)
    for option in dataclasses.fields(RetrainConfig):
        flag, meta, kind = "--" + option.name.replace("_", "-"), option.metadata, hints[option.name]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=option.default,
                               help=f"{meta['help']} (default {'on' if option.default else 'off'})")
        else:
            choice = is_choice(kind)  # its strings here; RetrainConfig makes them members
            group.add_argument(flag, type=str if choice else kind, default=option.default,
                               choices=[member.value for member in kind] if choice else None,
                               help=f"{meta['help']} (default {option.default})")


def retrain_config(args: argparse.Namespace) -> RetrainConfig:
    return RetrainConfig(**{option.name: getattr(args, option.name) for option in dataclasses.fields(RetrainConfig)})


def run(args: argparse.Namespace) -> int:
    if distributed.is_main():
        check_output_dir(args.output)
    student = load(args.file, custom=args.custom)
    spec = getattr(student, "labelless_spec", None)
    if spec is None:
        raise LabellessError(f"{args.file} holds a model saved without a spec: retrain it through the Python API")
    teacher = load_weights(build_model(spec), args.weights,
                           advice=f"give the checkpoint {args.file} was quantized from").eval()
    device = distributed.device(args.device)
    preprocess = Preprocess.for_spec(spec).to(device)
    config = retrain_config(args)
    checkpoints = Path(args.checkpoint_dir or f"{args.output}.ckpt")
    test = _test_set(args, spec)
    before = _accuracy(student, test, preprocess, device)
    result = _retrain(args, spec, student, teacher, preprocess, config, checkpoints, device)
    after = before if result.skipped else _accuracy(result.model, test, preprocess, device)
    if distributed.is_main():
        save(result.model, args.output, **storage_kwargs(args))
        summary = dict(result.summary(), test_accuracy_before=before, test_accuracy_after=after)
        atomic_write_json(f"{args.output}.json", summary)
        write_config(f"{args.output}.config.json", args, retrain=dataclasses.asdict(config))
    if result.skipped:  # retrain said why; the quantized model is written unchanged
        print(f"not retrained: {result.skipped}; wrote {args.output} unchanged")
    else:
        _print(result, before, after, args.output)
    return 0


def _retrain(args, spec, student, teacher, preprocess, config: RetrainConfig, checkpoints: Path, device):
    """Label-free (``--unlabeled``) or the labelled baseline (``--labeled``)."""
    size, channels = spec.image_size, spec.in_channels
    if args.unlabeled is not None:
        data = open_images(args.unlabeled, split="train", size=size, channels=channels, limit=args.limit,
                           seed=args.seed, skip_unreadable=args.skip_unreadable).unlabeled()
        return retrain(student, teacher, data, preprocess, config=config, checkpoint_dir=checkpoints, device=device)
    data = open_images(args.labeled, split="train", labeled=True, size=size, channels=channels, limit=args.limit,
                       seed=args.seed, skip_unreadable=args.skip_unreadable)
    return retrain(student, CrossEntropy(), data, preprocess, config=config, checkpoint_dir=checkpoints, device=device)


def _test_set(args, spec):
    """The labelled test set of ``--eval``: measured on rank 0 alone."""
    if not args.eval_data or not distributed.is_main():
        return None
    return open_images(args.eval_data, split="test", labeled=True, size=spec.image_size, channels=spec.in_channels)


def _accuracy(model, test, preprocess, device) -> float | None:
    if test is None:
        return None
    logits, labels = predict(model.to(device), test, preprocess, device=device)
    return accuracy(logits, labels)


def _print(result, before, after, output) -> None:
    metric = "accuracy" if "accuracy" in result.after else "agreement"
    line = (f"held-out {metric}: {result.before[metric]:.2f}% -> {result.after[metric]:.2f}% "
            f"(best epoch {result.best_epoch}), {result.seconds:.1f} s, {result.images_per_second:.0f} images/s")
    if before is not None:
        line += f"; test accuracy {before:.2f}% -> {after:.2f}%"
    print(f"{line}\nwrote {output}")

"""Flags and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..data import SPEC_FORMS, absolute_spec
from ..errors import LabellessError
from ..io import atomic_write_json
from ..models import ModelSpec, absolute_weights, build_model, check_input_size, load_weights, normalisation_for

log = logging.getLogger(__name__)


def add_model_args(parser: argparse.ArgumentParser, weights: bool = True, required: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required,
                       help="torchvision classifier (resnet18, vgg16_bn; `labelless models` lists them), "
                            "timm:NAME, or your own package.module:ClassName")
    group.add_argument("--model-args", type=_mapping, default={}, metavar="YAML",
                       help="constructor arguments of a custom --model, e.g. '{width: 2, depth: 8}'")
    group.add_argument("--num-classes", type=int, default=1000, help="outputs of the last layer (default 1000)")
    group.add_argument("--in-channels", type=int, default=3, help="input channels: 1 for grayscale (default 3)")
    group.add_argument("--small-input", action="store_true", help="stem for 28-32 px images")
    group.add_argument("--image-size", type=int, default=0, help="input size (default 32 with --small-input, else 224)")
    group.add_argument("--mean", type=_floats, default=(), help="per-channel normalisation mean, comma-separated: 0.286 (1 channel) "
                       "or 0.485,0.456,0.406 (default: stored in --weights, else ImageNet's)")
    group.add_argument("--std", type=_floats, default=(), help="per-channel normalisation std, comma-separated like --mean")
    if weights:
        group.add_argument("--weights", required=required, help="checkpoint: .safetensors or a .pt/.pth state_dict")


def add_custom_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="custom", default=None, metavar="PKG.MODULE:CLASS",
                        help="for a file of a custom model: its class, which you trust to be imported (labelless "
                             "imports no code a file names)")


def _mapping(text: str) -> dict:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{width: 2}}', got {text!r}")
    return value


def add_skip_unreadable(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="image folders: decode every file once and leave out those that fail (all named in "
                             "the log); by default the first one is an error")


def add_device_args(parser: argparse.ArgumentParser, batch_size: int = 256) -> None:
    add_device_arg(parser)
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch (default {batch_size})")
    parser.add_argument("--seed", type=int, default=0, help="seed for subsets and shuffling (default 0)")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when present)")


def add_unlabeled_arg(parser, required: bool = False, help: str = "unlabelled images") -> None:
    """``--unlabeled SPEC``, also spelt ``--unlabelled``."""
    parser.add_argument("--unlabeled", "--unlabelled", dest="unlabeled", required=required, default=None,
                        metavar="SPEC", help=f"{help}: {SPEC_FORMS}")



def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def fraction(text: str, flag: str) -> float:
    """A share such as ``0.93`` or ``93%``; a one-line error naming ``flag`` otherwise."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise LabellessError(f"{flag} must be a fraction in [0, 1) such as 0.93 or 93% (93% smaller), got {text!r}")
    return value


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The model the flags describe; a clear error if it cannot take images of that size.

    Without ``--mean/--std`` the normalisation stored in the ``--weights`` checkpoint (by
    ``labelless train`` or ``labelless run``) is used, so a teacher is never fed images
    normalised otherwise than in its training.
    """
    mean, std = _normalisation(args)
    spec = ModelSpec(
        args.model,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        small_input=args.small_input,
        image_size=args.image_size,
        mean=mean,
        std=std,
        model_args=getattr(args, "model_args", {}),
    )
    check_input_size(spec)
    return spec


def _normalisation(args: argparse.Namespace) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return normalisation_for(getattr(args, "weights", None), args.mean, args.std)


def model_from_args(args: argparse.Namespace) -> nn.Module:
    model = build_model(model_spec(args))
    if getattr(args, "weights", None):
        load_weights(model, args.weights)
    return model.eval()


def write_config(path: str | Path, args: argparse.Namespace, **extra: Any) -> None:
    """The resolved configuration of a command, next to its outputs; paths made absolute, so
    the same command can be run again from another folder."""
    data = {k: _absolute(k, list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "run"}
    data.update(extra)
    atomic_write_json(path, data)


_PATH_KEYS = ("weights", "plan")


def _absolute(key: str, value: Any) -> Any:
    """``value`` with a relative file path (or the path of a data spec such as ``images:x``) made absolute."""
    if not isinstance(value, str) or not value:
        return value
    if key in _PATH_KEYS:
        return absolute_weights(value)
    return absolute_spec(value)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")

"""``labelless quantize``: apply a plan to a checkpoint and write a .lless file."""

from __future__ import annotations

import argparse
import logging

from ..calibrate import calibrated_model
from ..data import Preprocess, check_spec, open_images
from ..errors import LabellessError
from ..fileformat import Entropy, save
from ..importance import DEFAULT_IMAGES, fisher_importance
from ..io import check_output_dir
from ..plan import load_plan
from ..report import inspect_table
from .common import add_model_args, add_skip_unreadable, add_unlabeled_arg, model_from_args

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="quantize a checkpoint by a plan into a .lless file")
    add_model_args(parser)
    parser.add_argument("--plan", required=True, help="plan file (YAML or JSON): see README")
    parser.add_argument("-o", "--output", required=True, help="the .lless file to write")
    add_importance_args(parser)
    add_storage_args(parser)
    parser.set_defaults(run=run)


def add_importance_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("label-free importance")
    add_unlabeled_arg(group, help="unlabelled images: weight the k-means by each weight's Fisher importance on "
                                  "them (labels are never read; without it, plain squared error)")
    group.add_argument("--limit", type=int, default=DEFAULT_IMAGES,
                       help=f"images the importance is averaged over (default {DEFAULT_IMAGES})")
    add_skip_unreadable(group)
    group.add_argument("--seed", type=int, default=0, help="seed for the image subset and drawn labels (default 0)")
    group.add_argument("--correct-bn", action="store_true",
                       help="then correct the BatchNorm statistics for the shift quantization causes, on the same "
                            "--unlabeled images: for images of the model's own domain (measured to hurt with "
                            "images of another domain; see docs/PEERS.md)")
    group.add_argument("--compensate", action="store_true",
                       help="re-choose each weight's centroid so that each layer's output moves least on the same "
                            "--unlabeled images (GPTQ over the codebooks; same file size)")


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("storage")
    group.add_argument("--entropy", choices=[e.value for e in Entropy], default="none",
                       help="entropy-code the indices (lossless)")
    group.add_argument("--fp16-codebooks", action="store_true", help="store codebooks in fp16")
    group.add_argument("--fp16-dense", action="store_true", help="store non-quantized tensors in fp16")


def storage_kwargs(args: argparse.Namespace) -> dict:
    return {
        "entropy": args.entropy,
        "codebook_dtype": "float16" if args.fp16_codebooks else "float32",
        "dense_dtype": "float16" if args.fp16_dense else "float32",
    }


def _images(model, args: argparse.Namespace):
    spec = model.labelless_spec
    return open_images(args.unlabeled, split="train", size=spec.image_size, channels=spec.in_channels,
                       limit=args.limit, seed=args.seed, skip_unreadable=args.skip_unreadable).unlabeled()


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.output)
    if args.unlabeled:
        check_spec(args.unlabeled)
    if args.limit < 1:
        raise LabellessError(f"--limit must be >= 1 image, got {args.limit}")
    for flag, wanted in (("--correct-bn", args.correct_bn), ("--compensate", args.compensate)):
        if wanted and not args.unlabeled:
            raise LabellessError(f"{flag} needs --unlabeled images to measure on")
    plan = load_plan(args.plan)
    model = model_from_args(args)
    images = _images(model, args) if args.unlabeled else None
    preprocess = Preprocess.for_spec(model.labelless_spec)
    importance = None if images is None else fisher_importance(model, images, preprocess, n_images=args.limit,
                                                               seed=args.seed)
    quantized = calibrated_model(model, plan, images, preprocess, importance=importance, compensate=args.compensate,
                                 correct_bn=args.correct_bn, n_images=args.limit, seed=args.seed, inplace=True)
    report = save(quantized, args.output, **storage_kwargs(args))
    print(inspect_table(report))
    log.info("wrote %s", args.output)
    return 0

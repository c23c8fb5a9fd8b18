"""``labelless train``: train an original model with labels (for demos and experiments)."""

from __future__ import annotations

import argparse
import logging

from ..data import Preprocess, open_images
from ..evaluate import accuracy, check_device, predict, resolve_device
from ..io import check_output_dir
from ..models import save_checkpoint
from ..train import TrainConfig, train_classifier
from .common import add_device_args, add_model_args, model_spec, write_config

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train an original model with labels (not part of compression)")
    add_model_args(parser, weights=False)
    parser.add_argument("--data", default="fashion-mnist", help="labelled data spec (default fashion-mnist)")
    parser.add_argument("--limit", type=int, default=None, help="train on this many images only")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="score this many images of the test split (default: all of them)")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                        help=f"passes over the data (default {TrainConfig.epochs})")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help=f"learning rate (default {TrainConfig.lr:g})")
    add_device_args(parser, batch_size=TrainConfig.batch_size)
    parser.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..models import build_model

    check_output_dir(args.output)
    check_device(args.device)
    _image_size_from_data(args)
    spec = model_spec(args)
    device = resolve_device(args.device)
    train = open_images(args.data, split="train", labeled=True, size=spec.image_size, channels=spec.in_channels,
                        limit=args.limit, seed=args.seed)
    test = open_images(args.data, split="test", labeled=True, size=spec.image_size, channels=spec.in_channels,
                       limit=args.test_limit, seed=args.seed)
    model = build_model(spec).to(device)
    preprocess = Preprocess.for_spec(spec).to(device)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    stats = train_classifier(model, train, preprocess, config=config, device=device)
    logits, labels = predict(model, test, preprocess, device=device)
    stats["test_accuracy"] = accuracy(logits, labels)
    save_checkpoint(model, args.output, spec)
    write_config(f"{args.output}.json", args, spec=spec.to_dict(), result=stats)
    print(f"trained {spec.name}: test accuracy {stats['test_accuracy']:.2f}% in {stats['seconds']:.0f} s -> {args.output}")
    return 0


def _image_size_from_data(args: argparse.Namespace) -> None:
    """Without ``--image-size``, train at the data's own size (28 px for Fashion-MNIST), not at 224."""
    if args.image_size:
        return
    first = open_images(args.data, split="train", labeled=True, limit=1, seed=args.seed)[0][0]
    args.image_size = int(min(first.shape[-2:]))
    log.info("image size %d px, from %s (give --image-size to train at another)", args.image_size, args.data)

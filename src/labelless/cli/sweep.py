"""``labelless sweep``: per-layer sensitivity, measured without labels.

Under torchrun the layers are split across the ranks; rank 0 writes the folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import distributed, provenance
from ..data import Preprocess, absolute_spec, open_images
from ..evaluate import check_device
from ..importance import DEFAULT_IMAGES, fisher_importance
from ..models import absolute_weights, weights_file
from ..plan import GRANULARITIES
from ..sensitivity import DEFAULT_CLUSTERS, SweepConfig, sweep
from .common import (
    add_device_args,
    add_model_args,
    add_skip_unreadable,
    add_unlabeled_arg,
    ints,
    model_from_args,
    write_config,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="quantize each layer alone at each k and measure the damage")
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument("--clusters", type=ints, default=DEFAULT_CLUSTERS, help="k values (default 1,2,4,...,256)")
    parser.add_argument("--no-bias", action="store_true", help="do not sweep biases")
    parser.add_argument("--granularity", type=_names, default=("per_tensor",),
                        help="codebook granularities to try for weights, e.g. per_tensor,per_channel "
                             "(default per_tensor)")
    parser.add_argument("--group-size", type=int, default=1, help="output channels per codebook with per_channel")
    parser.add_argument("--compensate", action="store_true",
                        help="measure each weight with GPTQ-compensated indices on the same images, as "
                             "`quantize --compensate` and `labelless run` ship it")
    parser.add_argument("--importance", choices=["fisher", "none"], default="fisher",
                        help="weight the k-means by label-free Fisher importance on the unlabelled images "
                             "(default fisher)")
    parser.add_argument("--importance-images", type=int, default=DEFAULT_IMAGES,
                        help=f"images the importance is averaged over (default {DEFAULT_IMAGES})")
    add_device_args(parser)
    parser.add_argument("-o", "--output", required=True, help="folder for sweep.csv, sweep.json and the plots")
    parser.set_defaults(run=run)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    add_unlabeled_arg(parser, required=True, help="unlabelled images to measure on")
    parser.add_argument("--eval", "--labeled", dest="labeled", default=None, metavar="SPEC",
                        help="optional labelled test set (its test split) to also report accuracy, as in retrain")
    parser.add_argument("--limit", type=int, default=2000, help="unlabelled images to measure on (default 2000)")
    add_skip_unreadable(parser)


def data_record(args: argparse.Namespace) -> dict:
    """Where the sweep's images (and the weights measured) come from, paths absolute: part of its
    provenance, from which ``labelless search`` opens the same images."""
    return provenance.data_record(weights=absolute_weights(args.weights), unlabeled=absolute_spec(args.unlabeled),
                                  labeled=absolute_spec(args.labeled) if args.labeled else None, limit=args.limit,
                                  seed=args.seed, skip_unreadable=args.skip_unreadable, batch_size=args.batch_size,
                                  by="labelless sweep")


def open_data(data: dict, spec):
    """The unlabelled (and the optional labelled) images a :func:`data_record` names."""
    size, channels, limit, seed = spec.image_size, spec.in_channels, data["limit"], data["seed"]
    unlabeled = open_images(data["unlabeled"], split="train", size=size, channels=channels, limit=limit, seed=seed,
                            skip_unreadable=data["skip_unreadable"])
    labeled = None
    if data["labeled"]:
        labeled = open_images(data["labeled"], split="test", labeled=True, size=size, channels=channels, limit=limit,
                              seed=seed)
    return unlabeled.unlabeled(), labeled


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    check_device(args.device)  # every flag is checked before any work and before any file
    config = SweepConfig(clusters=args.clusters, include_bias=not args.no_bias, batch_size=args.batch_size,
                         granularities=args.granularity, group_size=args.group_size, compensate=args.compensate)
    model = model_from_args(args)
    spec = model.labelless_spec
    record = data_record(args)
    unlabeled, labeled = open_data(record, spec)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    weights = os.stat(weights_file(args.weights))
    skip = ("run", "output", "device", "verbose", "quiet") + (() if args.model_args else ("model_args",))
    identity = {"args": {k: v for k, v in vars(args).items() if k not in skip},  # earlier sweeps still resume
                "weights": [weights.st_size, weights.st_mtime_ns]}
    if distributed.is_main():
        write_config(out / "config.json", args, spec=spec.to_dict())
    device = distributed.device(args.device)
    importance = _importance(model, unlabeled, spec, args, device)
    result = sweep(model, unlabeled, Preprocess.for_spec(spec), labeled=labeled, config=config,
                   out_dir=out, identity=_plain(identity), device=device, importance=importance, data=record)
    bias = result.summary.get("biases_at_1")
    print(f"swept {len({r.layer for r in result.rows})} layers x {len(args.clusters)} values of k: "
          f"{len(result.rows)} rows -> {out / 'sweep.csv'}")
    if bias:
        print(f"one centroid per bias: mean agreement {bias['mean_agreement']:.2f}%, "
              f"worst {bias['worst_agreement']:.2f}% ({bias['worst_layer']})")
    return 0


def _names(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [n for n in names if n not in GRANULARITIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"granularities are {', '.join(GRANULARITIES)}; got {text!r}")
    return names


def _importance(model, unlabeled, spec, args: argparse.Namespace, device):
    """Fisher importance on the sweep's unlabelled images (the sweep keeps it in its folder for
    the search), or None."""
    if args.importance == "none":
        return None
    return fisher_importance(model, unlabeled, Preprocess.for_spec(spec), n_images=args.importance_images,
                             seed=args.seed, device=device)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

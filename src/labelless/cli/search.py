"""``labelless search``: the smallest plan whose measured drop fits a budget."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import provenance
from ..data import Preprocess
from ..errors import LabellessError
from ..evaluate import check_device, resolve_device
from ..importance import load_importance
from ..io import atomic_write_json, check_output_dir
from ..models import ModelSpec, build_model, check_input_size, is_weights_name, load_weights
from ..report import format_table, plot_search
from ..search import METRICS, check_metric, make_evaluator, search
from ..sensitivity import SweepResult, prepare_reference
from ..zoo import model_source
from .common import add_custom_arg, add_device_arg, fraction
from .sweep import open_data


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("search", help="find the smallest plan within an accuracy budget")
    parser.add_argument("sweep_dir", help="the folder a `labelless sweep` wrote")
    parser.add_argument("--max-drop", type=float, default=None,
                        help="budget in points of --metric (agreement by default)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="size budget in bytes; alone, the search returns the most faithful plan that fits")
    parser.add_argument("--smaller-by", default=None, metavar="FRACTION",
                        help="size budget as the share of the fp32 size to save: 0.93 or 93%% (at most 7%% of it)")
    parser.add_argument("--metric", choices=METRICS, default="agreement",
                        help="agreement with the original on the sweep's unlabelled images (default); balanced: "
                             "that agreement averaged over the classes the original predicts there (when it calls "
                             "most of them one class); or accuracy on its --eval test set")
    add_device_arg(parser)
    add_custom_arg(parser)
    parser.add_argument("-o", "--output", required=True, help="the plan file to write (.yaml or .json)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.output)
    if Path(args.output).suffix.lower() not in (".yaml", ".yml", ".json"):
        raise LabellessError(f"-o {args.output!r}: a plan file ends in .yaml, .yml or .json")
    check_device(args.device)
    args.smaller_by = fraction(args.smaller_by, "--smaller-by") if args.smaller_by is not None else None
    folder = _sweep_folder(args.sweep_dir)
    result = SweepResult.from_data(_read_json(folder / "sweep.json", "no finished sweep"))  # one line if cut or edited
    origin = _provenance(result, folder, args.custom)
    importance = _importance(origin, folder)
    check_metric(result.rows, args.metric, result.reference)
    model, spec = _swept_model(origin, folder)
    unlabeled, labeled = open_data(origin["data"], spec)
    if args.metric == "accuracy" and labeled is None:
        raise LabellessError("--metric accuracy needs a sweep run with --eval data; use --metric agreement")
    device = resolve_device(args.device)
    reference = prepare_reference(model.to(device), unlabeled, Preprocess.for_spec(spec), labeled,
                                  origin["data"]["batch_size"], device)
    provenance.check_images(origin, reference.images_digest, folder)
    reference.importance = importance  # what the sweep clustered with
    found = search(result, make_evaluator(reference, args.metric), max_drop=args.max_drop, max_bytes=args.max_bytes,
                   metric=args.metric, smaller_by=args.smaller_by)
    best = found.best
    found.best.plan().save(args.output, header=f"labelless search: {best.bytes} bytes, measured {args.metric} drop "
                           f"{best.measured_drop:.2f} points (budget {args.max_drop} points, {_size_text(args)}), "
                           f"predicted {_points(best.predicted_drop)}")
    atomic_write_json(Path(args.output).with_suffix(".search.json"), found.to_dict())
    plot_search(found, result.reference["fp32_bytes"], Path(args.output).with_suffix(".search.png"))
    rows = [(c.bytes, f"{100 * (1 - c.bytes / result.reference['fp32_bytes']):.2f}%", _points(c.predicted_drop),
             c.measured_drop,
             "<- chosen" if c is best else "") for c in found.alternatives]
    print(format_table(rows, ["bytes", "smaller by", "predicted drop", "measured drop", ""]))
    print(f"plan -> {args.output}")
    return 0


def _points(predicted: float) -> str:
    """The additive prediction (a sum of single-tensor drops) as points; past 100 it says only that."""
    return f"{predicted:.2f}" if predicted <= 100 else "over 100"


def _size_text(args: argparse.Namespace) -> str:
    parts = [f"{args.max_bytes} bytes" if args.max_bytes is not None else "",
             f"{100 * args.smaller_by:g}% smaller" if args.smaller_by is not None else ""]
    return ", ".join(p for p in parts if p) or "no size budget"


def _sweep_folder(text: str) -> Path:
    folder = Path(text)
    if not folder.is_dir():
        raise LabellessError(f"sweep folder {text!r} does not exist or is not a folder: "
                             f"give the -o folder of a `labelless sweep`")
    return folder


def _provenance(result: SweepResult, folder: Path, custom: str | None) -> dict[str, Any]:
    """What the sweep in ``folder`` measured (its model, weights and images), checked before any
    is read: a custom model is imported only when named, and the weights must still be there."""
    origin = provenance.check(result.provenance, folder)
    name = origin["model"].get("name")
    if model_source(str(name)) == "custom" and custom != name:
        raise LabellessError(f"the sweep in {folder} is of the custom model {name}: labelless imports no "
                             f"code a file names; give --model {name} to search it")
    weights = origin["data"]["weights"]
    if weights and not (is_weights_name(weights) or Path(weights).exists()):
        raise LabellessError(f"the weights {weights!r} the sweep in {folder} measured do not exist: "
                             f"put them back, or {provenance.again(origin)}")
    return origin


def _importance(origin: dict[str, Any], folder: Path):
    """The importance the sweep's k-means was weighted by (None if it was not); one line if lost."""
    if not origin.get("importance"):
        return None
    importance = load_importance(folder / provenance.IMPORTANCE_FILE)
    if importance is None:
        raise LabellessError(f"{folder} lacks {provenance.IMPORTANCE_FILE}, the importance its rows were clustered "
                             f"with: put it back, or {provenance.again(origin)}")
    return importance


def _swept_model(origin: dict[str, Any], folder: Path):
    """The model the sweep measured, rebuilt from its provenance; one line if its weights changed."""
    spec = ModelSpec.from_dict(origin["model"])
    check_input_size(spec)
    model = build_model(spec)
    if origin["data"]["weights"]:
        load_weights(model, origin["data"]["weights"])
    provenance.check_weights(origin, model, folder)
    return model.eval(), spec


def _read_json(path: Path, lacking: str) -> Any:
    """The JSON in ``path``; one line saying what to do if it is missing or malformed."""
    if not path.is_file():
        raise LabellessError(f"{path.parent} holds {lacking} ({path.name}): run `labelless sweep -o {path.parent}` first")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabellessError(f"cannot read {path} ({type(exc).__name__}): run `labelless sweep -o {path.parent}` "
                             f"again") from None

"""Per-layer sensitivity sweep, without labels.

For every quantizable layer's weights, and for its bias as a row of its own, at each k:
quantize that tensor alone and measure how far the outputs move from the original model's
on unlabelled images (top-1 agreement, class-balanced agreement, mean KL divergence), the accuracy on a labelled set
when one is given, and the exact size of the ``.lless`` file that plan would give.

The original model runs once; for each layer only what depends on it is recomputed
(:mod:`labelless.incremental`). Rows are appended to ``DIR/rows.jsonl`` layer by layer,
so a sweep killed halfway continues where it stopped when run again with the same settings.

Under torchrun the layers are dealt out in rounds, one layer per rank per round; each round's
rows are gathered on every rank, rank 0 alone keeps the journal and writes the outputs, and
the table is the one a single process makes (each layer is measured by the same code on the
same batches, whichever rank runs it).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed, provenance
from .compensate import assign_indices, compensable, input_hessian, solver
from .config import option
from .errors import LabellessError
from .evaluate import accuracy, autocast, fidelity, warn_if_collapsed
from .importance import save_importance
from .incremental import Splitter
from .io import atomic_write_json, atomic_write_text
from .layers import LayerInfo, list_layers
from .models import tensor_bytes
from .plan import GRANULARITIES, Plan, TensorChoice
from .progress import progress
from .quantize import cluster_tensor, decode
from .sizing import FileSizer

__all__ = [
    "SweepConfig", "SweepRow", "SweepResult", "Reference", "sweep", "prepare_reference", "variant", "DEFAULT_CLUSTERS"
]

log = logging.getLogger(__name__)

DEFAULT_CLUSTERS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


MAX_SWEEP_CLUSTERS = 1 << 16


@dataclass(frozen=True)
class SweepConfig:
    """What the sweep tries and on how many images."""

    clusters: tuple[int, ...] = option(DEFAULT_CLUSTERS, 'values of k tried for every tensor')
    include_bias: bool = option(True, "also sweep each layer's bias as a tensor of its own")
    batch_size: int = option(256, 'images per batch of the sweep')
    granularities: tuple[str, ...] = option(("per_tensor",), 'codebook granularities tried for weights: per_tensor, '
                                                             'per_channel')
    group_size: int = option(1, 'output channels per codebook when per_channel')
    compensate: bool = option(False, "measure each weight with GPTQ-compensated indices on the sweep's images "
                                     "(measured worse on the demo: layers compensated alone look cheaper than in a "
                                     "full plan; docs/SWEEP.md)")

    def __post_init__(self) -> None:
        clusters = tuple(sorted(set(self.clusters)))
        if not clusters or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in clusters):
            raise LabellessError(f"clusters must be whole numbers >= 1, got {list(self.clusters)}")
        if clusters[-1] > MAX_SWEEP_CLUSTERS:
            raise LabellessError(f"clusters above {MAX_SWEEP_CLUSTERS} (more than 16-bit indices) save little over fp32 "
                                 f"and need memory in proportion to k for the exact k-means; got {clusters[-1]}: "
                                 f"sweep at most {MAX_SWEEP_CLUSTERS}")
        if self.batch_size < 1:
            raise LabellessError(f"batch size must be >= 1, got {self.batch_size}")
        granularities = tuple(dict.fromkeys(self.granularities))
        if not granularities or any(g not in GRANULARITIES for g in granularities):
            raise LabellessError(f"granularities must be among {list(GRANULARITIES)}, got {list(self.granularities)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise LabellessError(f"group size must be a whole number >= 1, got {self.group_size!r}")
        object.__setattr__(self, "clusters", clusters)
        object.__setattr__(self, "granularities", granularities)

    def choices(self, tensor: str, shape: tuple[int, ...]) -> list[TensorChoice]:
        """What to try for one tensor: every k, at every granularity that applies to it."""
        grains = self.granularities if tensor == "weight" and len(shape) >= 2 else ("per_tensor",)
        return [TensorChoice(k, g, self.group_size if g != "per_tensor" else 1) for g in grains for k in self.clusters]


@dataclass
class SweepRow:
    """One tensor quantized alone at one k, and what it did."""

    index: int  # layer position in forward order (1-based)
    layer: str  # dotted module name
    type: str
    tensor: str  # "weight" or "bias"
    n_values: int
    k: int  # centroids asked for
    n_clusters: int  # centroids obtained (fewer when the tensor has fewer distinct values)
    agreement: float  # percent of unlabelled images where the top-1 class is unchanged
    kl: float  # mean KL(original || quantized) on the unlabelled images
    bytes: int  # size of the .lless file for this one-tensor plan
    accuracy: float | None = None  # percent, on the labelled set when one is given
    granularity: str = "per_tensor"  # one codebook, or one per group_size output channels
    group_size: int = 1
    balanced: float | None = None  # agreement averaged over the original's predicted classes (None: older sweep)

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.tensor}" if self.layer else self.tensor

    @property
    def choice(self) -> TensorChoice:
        """What was asked for this row (k centroids at this granularity)."""
        return TensorChoice(self.k, self.granularity, self.group_size)

    @property
    def obtained(self) -> TensorChoice:
        """What the row's file holds (fewer centroids when the tensor has fewer values)."""
        return TensorChoice(self.n_clusters, self.granularity, self.group_size)


@dataclass
class SweepResult:
    rows: list[SweepRow]
    reference: dict[str, Any]  # the original model: bytes, accuracy, images used
    summary: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # model, weights digest, data (labelless.provenance)
    context: Reference | None = field(default=None, repr=False, compare=False)  # in-process: what it measured on

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "summary": self.summary,
            "provenance": self.provenance,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dir(cls, folder: str | Path) -> "SweepResult":
        path = Path(folder) / "sweep.json"
        if not path.is_file():
            raise LabellessError(f"{folder} holds no finished sweep (no sweep.json): run `labelless sweep -o {folder}` first")
        return cls.from_data(json.loads(path.read_text()))

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "SweepResult":
        """The result :meth:`to_dict` wrote, read back."""
        return cls([SweepRow(**row) for row in data["rows"]], data["reference"], data.get("summary", {}),
                   data.get("provenance", {}))


@dataclass
class Reference:
    """The original model and what it does on the sweep's images, computed once."""

    model: nn.Module
    modules: dict[str, nn.Module]
    inputs: list[torch.Tensor]  # preprocessed unlabelled batches, on the device
    teacher: torch.Tensor  # the original model's logits on them (CPU)
    labeled: tuple[list[torch.Tensor], torch.Tensor] | None  # batches and labels
    spec: Any
    device: torch.device
    sizer: FileSizer
    importance: dict[str, torch.Tensor] | None = None  # label-free weights of the k-means
    images_digest: str = ""  # sha256 of the unlabelled images' uint8 pixels, as read (provenance)

    def run(self, batches: list[torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        """Logits of ``model`` (by default the original, as the sweep has modified it) on ``batches``."""
        with torch.no_grad():
            return torch.cat([_run(model or self.model, x, self.device) for x in batches])

    def figures_of(self, model: nn.Module) -> dict[str, float]:
        """:meth:`measure` of another model (a quantized and compensated or a retrained student)."""
        return self.measure(model.to(self.device).eval())

    def measure(self, model: nn.Module | None = None) -> dict[str, float]:
        """Agreement, class-balanced agreement and KL of ``model`` (by default the original, as
        the sweep has modified it) with the original on the unlabelled images; accuracy if labelled."""
        figures = fidelity(self.run(self.inputs, model), self.teacher)
        if self.labeled:
            figures["accuracy"] = accuracy(self.run(self.labeled[0], model), self.labeled[1])
        return figures


def sweep(
    model: nn.Module,
    unlabeled: torch.utils.data.Dataset,
    preprocess: nn.Module,
    *,
    labeled: torch.utils.data.Dataset | None = None,
    config: SweepConfig = SweepConfig(),
    out_dir: str | Path | None = None,
    identity: dict[str, Any] | None = None,
    device: torch.device | None = None,
    importance: dict[str, torch.Tensor] | None = None,
    data: dict[str, Any] | None = None,
) -> SweepResult:
    """Sweep every tensor of ``model`` at every k in ``config.clusters`` (and every
    granularity in ``config.granularities``), clustering under ``importance`` when given.

    ``identity`` (anything JSON, e.g. the CLI arguments) decides whether rows already in
    ``out_dir`` belong to this sweep and can be reused. ``data`` says where the images came
    from (JSON: dataset specs, limit, seed); with the model's spec and weights' digest it is the
    result's provenance, from which ``labelless search`` rebuilds them. The result's ``context``
    holds the images and outputs measured on, for a search in the same process.

    Example:
        >>> result = sweep(model, open_images("mnist", size=32), Preprocess.for_spec(spec), out_dir="sweep")
        >>> min(r.agreement for r in result.rows if r.k == 256)
        99.6
    """
    device = device or next(model.parameters()).device
    ctx = prepare_reference(model.to(device).eval(), unlabeled, preprocess, labeled, config.batch_size, device)
    ctx.importance = importance
    origin = provenance.record(model, ctx.images_digest, data, importance is not None)
    splitter = Splitter(model)
    layers = list_layers(model)
    main = distributed.is_main()
    journal = _Journal(out_dir if main else None, {"config": dataclasses.asdict(config), "identity": identity})
    rows = _rows(distributed.broadcast_object(_dicts(journal.rows())))
    done = {(r.layer, r.tensor, r.choice) for r in rows}
    pending = [layer for layer in layers if _jobs(ctx, layer, config, done)]
    for layers_now in progress(_rounds(pending), desc="sweep", unit="round"):
        new = _sweep_round(ctx, splitter, layers_now, config, done)
        journal.append(new)
        rows.extend(new)
    result = dataclasses.replace(_finish(ctx, rows, layers, len(unlabeled)), provenance=origin, context=ctx)
    if out_dir is not None and main:
        write_sweep(result, Path(out_dir))
    return result


def _rounds(pending: list[LayerInfo]) -> list[list[LayerInfo]]:
    """Layers in rounds of one per rank (one layer a round in a single process); neighbours
    share a round, as their cost is alike and a round lasts as long as its slowest layer."""
    size = distributed.world_size()
    return [pending[start:start + size] for start in range(0, len(pending), size)]


def _sweep_round(ctx: Reference, splitter: Splitter, layers: list[LayerInfo], config: SweepConfig,
                 done: set) -> list[SweepRow]:
    """Rank r sweeps ``layers[r]``; every rank gets all the round's rows, in rank order."""
    me = distributed.rank()
    mine = (_sweep_layer(ctx, splitter, layers[me], _jobs(ctx, layers[me], config, done), config.compensate)
            if me < len(layers) else [])
    if distributed.world_size() == 1:
        return mine
    return [row for part in distributed.gather_objects(_dicts(mine)) for row in _rows(part)]


def _dicts(rows: Sequence[SweepRow]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) for r in rows]


def _rows(dicts: Sequence[dict[str, Any]]) -> list[SweepRow]:
    return [SweepRow(**d) for d in dicts]


def prepare_reference(
    model: nn.Module,
    unlabeled: torch.utils.data.Dataset,
    preprocess: nn.Module,
    labeled: torch.utils.data.Dataset | None,
    batch_size: int,
    device: torch.device,
) -> Reference:
    """Preprocess the images once and run the original model on them once."""
    from .data import loader

    def batches(dataset):
        for item in loader(dataset, batch_size):
            yield item if isinstance(item, (list, tuple)) else (item,)

    raw = [b[0] for b in batches(unlabeled)]
    if not raw:
        raise LabellessError("the unlabelled set is empty: give it some images")
    with torch.no_grad():
        inputs = [preprocess(x.to(device)) for x in raw]
        teacher = torch.cat([_run(model, x, device) for x in inputs])
        lab = None
        if labeled is not None:
            pairs = list(batches(labeled))
            lab = ([preprocess(x.to(device)) for x, _ in pairs], torch.cat([y for _, y in pairs]))
    warn_if_collapsed(teacher, "the sweep's unlabelled images")
    spec = getattr(model, "labelless_spec", None)
    return Reference(model, dict(model.named_modules()), inputs, teacher, lab, spec, device, FileSizer(model, spec),
                     images_digest=_images_digest(raw))


def _images_digest(batches: list[torch.Tensor]) -> str:
    """sha256 of the images as read (uint8 pixels on the CPU): their type and shape, then their
    bytes in order, so the same images in other batches give the same digest."""
    digest = hashlib.sha256(f"{batches[0].dtype}{tuple(batches[0].shape[1:])}".encode())
    for batch in batches:
        digest.update(tensor_bytes(batch))
    return digest.hexdigest()


def _run(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with autocast(device):
        return model(x).float().cpu()


def _jobs(ctx: Reference, layer: LayerInfo, config: SweepConfig, done: set) -> list[tuple[str, TensorChoice]]:
    module = ctx.modules[layer.name]
    tensors = ["weight"] + (["bias"] if config.include_bias and getattr(module, "bias", None) is not None else [])
    return [(t, c) for t in tensors for c in config.choices(t, tuple(getattr(module, t).shape))
            if (layer.name, t, c) not in done]


@torch.no_grad()
def _sweep_layer(ctx: Reference, splitter: Splitter, layer: LayerInfo, jobs: list[tuple[str, TensorChoice]],
                 compensate: bool = False) -> list[SweepRow]:
    module = ctx.modules[layer.name]
    key = f"{layer.name}." if layer.name else ""
    prepared = _solver(ctx, module) if compensate and any(t == "weight" for t, _ in jobs) else None
    variants = [variant(module, tensor, choice, scores_of(ctx, key + tensor), prepared if tensor == "weight" else None)
                for tensor, choice in jobs]
    prefix, suffix = splitter.split(layer.name)
    sets = [ctx.inputs] + ([ctx.labeled[0]] if ctx.labeled else [])
    outputs = [[[] for _ in sets] for _ in variants]
    originals = {tensor: getattr(module, tensor).detach().clone() for tensor, _ in jobs}
    try:
        for s, batches in enumerate(sets):
            for x in batches:
                with autocast(ctx.device):
                    frontier = prefix(x)
                    for v, (tensor, _, weights, _) in enumerate(variants):
                        getattr(module, tensor).copy_(weights)
                        outputs[v][s].append(suffix(*frontier).float().cpu())
                        getattr(module, tensor).copy_(originals[tensor])
    finally:
        for tensor, original in originals.items():
            getattr(module, tensor).copy_(original)
    return [_row(ctx, layer, variant, [torch.cat(o) for o in out]) for variant, out in zip(variants, outputs)]


def scores_of(ctx: Reference, key: str) -> torch.Tensor | None:
    """The importance the reference clusters tensor ``key`` under, or None."""
    return None if ctx.importance is None else ctx.importance.get(key)


def _solver(ctx: Reference, module: nn.Module):
    """GPTQ's solver of ``module`` on the sweep's images (the original model's inputs to it), or
    None for a layer that compensation leaves at nearest-centroid indices."""
    if not compensable(module):
        return None
    return solver(input_hessian(ctx.model, module, torch.cat(ctx.inputs), len(ctx.inputs[0])))


def variant(module: nn.Module, tensor: str, choice: TensorChoice | int, importance: torch.Tensor | None = None,
            prepared: tuple | None = None) -> tuple[str, TensorChoice, torch.Tensor, int]:
    """(tensor, choice, the tensor quantized by that choice, centroids obtained); with a layer's
    GPTQ solver (``prepared``, :func:`labelless.compensate.solver`), the indices compensated."""
    param = getattr(module, tensor).detach()
    choice = TensorChoice.of(choice)
    centroids, indices = cluster_tensor(param, choice, importance)
    if prepared is not None:
        indices = assign_indices(param.cpu(), centroids, prepared).to(indices.dtype)
    dense = decode(centroids, indices).view(param.shape)
    return tensor, choice, dense.to(param.device, param.dtype), int(centroids.shape[-1])


def _row(ctx: Reference, layer: LayerInfo, variant, outputs: list[torch.Tensor]) -> SweepRow:
    tensor, choice, _, n_clusters = variant
    key = f"{layer.name}.{tensor}" if layer.name else tensor
    obtained = TensorChoice(n_clusters, choice.granularity, choice.group_size)
    return SweepRow(
        index=layer.index,
        layer=layer.name,
        type=layer.type,
        tensor=tensor,
        n_values=layer.n_weights if tensor == "weight" else layer.n_bias,
        k=choice.k,
        n_clusters=n_clusters,
        **fidelity(outputs[0], ctx.teacher),
        bytes=ctx.sizer.size({key: obtained}, Plan.from_choice({key: choice}).to_data()),
        accuracy=accuracy(outputs[1], ctx.labeled[1]) if ctx.labeled else None,
        granularity=choice.granularity,
        group_size=choice.group_size,
    )


def _finish(ctx: Reference, rows: list[SweepRow], layers: list[LayerInfo], n_images: int) -> SweepResult:
    order = {layer.name: layer.index for layer in layers}
    rows.sort(key=lambda r: (order.get(r.layer, 0), r.tensor != "weight", r.granularity, r.k))
    reference = {
        "fp32_bytes": ctx.sizer.fp32_bytes,
        "unquantized_bytes": ctx.sizer.size({}),
        "unlabeled_images": n_images,
        "accuracy": None,
    }
    if ctx.labeled:
        reference["accuracy"] = accuracy(ctx.run(ctx.labeled[0]), ctx.labeled[1])
        reference["labeled_images"] = int(ctx.labeled[1].numel())
    return SweepResult(rows, reference, {"biases_at_1": _biases_at_one(rows)})


def _biases_at_one(rows: list[SweepRow]) -> dict[str, Any]:
    """Does one centroid per bias cost anything? The single-layer rows say, per layer."""
    bias = [r for r in rows if r.tensor == "bias" and r.k == 1]
    if not bias:
        return {}
    worst = min(bias, key=lambda r: r.agreement)
    return {
        "layers": len(bias),
        "mean_agreement": float(np.mean([r.agreement for r in bias])),
        "worst_layer": worst.layer,
        "worst_agreement": worst.agreement,
    }


# -- the journal: rows of a sweep in progress ----------------------------------------------


class _Journal:
    """``rows.jsonl``: a first line naming the settings, then one JSON row per line.

    A line cut short by a kill is ignored; rows of other settings are discarded.
    """

    def __init__(self, folder: str | Path | None, settings: dict[str, Any]):
        self.path = None if folder is None else Path(folder) / "rows.jsonl"
        self.settings = json.loads(json.dumps(settings))
        if self.path is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)

    def rows(self) -> list[SweepRow]:
        if self.path is None or not self.path.is_file():
            return self._start()
        lines = self.path.read_text().splitlines()
        if not lines or _parse(lines[0]) != {"settings": self.settings}:
            log.warning("%s holds a sweep with other settings: starting again", self.path.parent)
            return self._start()
        rows = [row for row in (_parse(line) for line in lines[1:]) if isinstance(row, dict)]
        fields = {f.name for f in dataclasses.fields(SweepRow)}
        kept = [SweepRow(**row) for row in rows if set(row) == fields]
        if len(kept) < len(rows):
            log.warning("%d rows in %s were written by another version of labelless (other figures): measuring "
                        "them again", len(rows) - len(kept), self.path)
        if kept:
            log.info("resuming the sweep in %s: %d rows already done", self.path.parent, len(kept))
        atomic_write_text(self.path, "".join(line + "\n" for line in [lines[0]] + [json.dumps(dataclasses.asdict(r)) for r in kept]))
        return kept

    def _start(self) -> list[SweepRow]:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"settings": self.settings}) + "\n")
        return []

    def append(self, rows: Sequence[SweepRow]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            handle.write("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows))
            handle.flush()
            os.fsync(handle.fileno())


def _parse(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


# -- outputs -------------------------------------------------------------------------------


def write_sweep(result: SweepResult, folder: Path) -> None:
    """``sweep.json``, ``sweep.csv`` and the plots, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    if result.context is not None:  # the importance a later search clusters with, before the finished sweep.json
        path = folder / provenance.IMPORTANCE_FILE
        if result.context.importance is not None:
            save_importance(result.context.importance, path)
        else:
            path.unlink(missing_ok=True)  # a search must not use an earlier sweep's
    atomic_write_json(folder / "sweep.json", result.to_dict())
    atomic_write_text(folder / "sweep.csv", _csv(result.rows))
    from .report import plot_sweep

    plot_sweep(result, folder)


def _csv(rows: list[SweepRow]) -> str:
    import io

    buffer = io.StringIO()
    names = [f.name for f in dataclasses.fields(SweepRow)]
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(dataclasses.asdict(row))
    return buffer.getvalue()

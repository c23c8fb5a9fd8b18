"""Label-free retraining (and the labelled baseline it is compared with): one loop, an objective.

The quantized model (the *student*) keeps its quantized tensors frozen (codebooks and
indices unchanged, unless ``tune_centroids``); every other parameter is trained so that its
outputs match the original model's (the *teacher*) on unlabelled images, which may come
from another domain. No label is read anywhere on that path.

Defaults, and why:

* ``bn="frozen"``: the student's BatchNorm layers keep the running statistics of the
  original training data (affine parameters still train). Re-estimating them on images of
  another domain is AdaBN toward the wrong domain: in a prototype (Fashion-MNIST VGG-16-bn
  distilled on MNIST digits) updating them cost 10 points, freezing them cost 0.8.
  ``bn="update"`` is offered for same-domain data.
* ``balance=True``: images are resampled so that the teacher's predicted classes are
  balanced (on raw digits the teacher calls 73% of them "sandal").
* ``cutmix=0``: off by default. ``cutmix=p`` CutMixes a share ``p`` of the batches, and the
  teacher then runs on each mixed batch (its outputs on a mixed image are not the mixture of
  its outputs on the two images: matching that mixture instead cost 0.86 points). Measured on
  the demo, 2 epochs on 2,000 digits, 3 seeds (docs/DEMO.md): off 83.74%, 0.25 83.71%,
  0.5 83.63%, while 0.5 trains at about 0.8x the images/s; it paid +0.23 points in a 20-pass
  prototype (RESEARCH.md), so longer runs may want it.
* ``refine_steps=0``: off by default (it costs a forward and backward pass of the teacher per
  image and step). For images from another domain, ``refine_steps=50`` first pulls them
  toward the teacher's BatchNorm statistics (:mod:`labelless.refine`); measured on a ResNet-18
  at 93% size reduction distilled on MNIST digits: 67.9% -> 80.6% (docs/DEMO.md).
* ``features=0``: logits only by default. ``features=w`` adds ``w`` times the normalised
  squared error between every layer's output and the teacher's on the same images
  (:mod:`labelless.features`); the teacher then runs on every batch.
* part of the unlabelled data is held out; a later epoch replaces the kept state only when it
  agrees with the teacher better on those images beyond their noise (:mod:`labelless.selection`),
  so retraining never hands back a model worse than it started on them; with fewer than
  ``min_holdout`` held-out images it keeps the starting model and says why.

A checkpoint is written every epoch; a run killed midway resumes from its last one and
ends with the same result as an uninterrupted run (deterministic under a seed on CPU).

Under torchrun (:mod:`labelless.distributed`) the student is wrapped in
DistributedDataParallel: every rank draws the same seeded order for an epoch and trains on its
share of it, dealt as ``DistributedSampler`` deals (``batch_size`` images per rank and step);
the teacher's logits and the held-out scores are computed a share per rank and gathered, so
every rank sees the same numbers; rank 0 alone writes checkpoints, which hold the plain
student's tensors and resume with any number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import Choice, coerce_choices, option
from .data import DatasetImages, ImageSet, batch_source
from .errors import LabellessError
from .evaluate import autocast
from .io import atomic_path
from .models import state_digest, tensor_bytes
from .objectives import CrossEntropy, Distillation, Loss, Objective, as_objective
from .progress import progress
from .quantize import quantized_tensors
from .selection import MIN_HOLDOUT, Evidence, significantly_better, too_few_held_out

__all__ = ["RetrainConfig", "RetrainResult", "retrain", "trainable_parameters", "Objective", "Distillation",
           "CrossEntropy", "Loss", "BatchNorm"]

log = logging.getLogger(__name__)

NOTHING_TO_RETRAIN = "every parameter is quantized, so nothing is left to retrain"


class BatchNorm(Choice):
    FROZEN = "frozen"
    UPDATE = "update"


@dataclass(frozen=True)
class RetrainConfig:
    """How to retrain; every field is a flag of ``labelless retrain`` (``--<field-name>``) and a
    key of ``run``'s ``retrain:`` section, with the help text below."""

    epochs: int = option(5, "passes over the retraining images")
    lr: float = option(1e-3, "Adam learning rate of the non-quantized parameters")
    weight_decay: float = option(0.0, "Adam weight decay")
    batch_size: int = option(128, "images per step (per process under torchrun)")
    loss: Loss = option(Loss.KL, "label-free loss on the logits: kl (temperature-softened softmax) or mse")
    temperature: float = option(1.0, "softmax temperature of the kl loss")
    bn: BatchNorm = option(BatchNorm.FROZEN, "BatchNorm statistics: keep the original's (frozen, safe across "
                                             "domains) or re-estimate them (update)")
    balance: bool = option(True, "label-free: resample so that the teacher's predicted classes are balanced")
    cutmix: float = option(0.0, "label-free: probability that a batch is CutMix-ed (0: off); the teacher runs "
                                "on each mixed batch")
    holdout: float = option(0.1, "fraction of the images held out to pick the best epoch")
    min_holdout: int = option(MIN_HOLDOUT, "held-out images needed to pick an epoch (fewer: the starting model "
                                           "is kept, with the reason)")
    tune_centroids: bool = option(False, "also learn the codebook values (indices stay; the size too)")
    centroid_lr: float = option(1e-4, "learning rate of the codebook values, with --tune-centroids")
    refine_steps: int = option(0, "label-free: first pull the images toward the teacher's BatchNorm statistics "
                                   "for this many Adam steps (for images of another domain; 50 is a good start)")
    features: float = option(0.0, "label-free: also match every layer's output to the teacher's, with this "
                                   "weight next to the logit loss (0: logits only)")
    seed: int = option(0, "seed of the data order, the held-out split and CutMix")
    amp: bool = option(True, "bf16 autocast on CUDA")
    channels_last: bool = option(True, "channels-last memory format on CUDA")

    def __post_init__(self) -> None:
        coerce_choices(self)
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1,
             f"epochs must be a whole number >= 1 (0 would train nothing), got {self.epochs!r}"),
            (self.lr > 0 and self.centroid_lr > 0, "learning rates must be > 0"),
            (self.batch_size >= 1, "batch size must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (0 <= self.cutmix <= 1, "cutmix is a probability in [0, 1]"),
            (0 < self.holdout < 1, "holdout is a fraction in (0, 1)"),
            (isinstance(self.min_holdout, int) and self.min_holdout >= 1,
             f"min_holdout must be a whole number >= 1, got {self.min_holdout!r}"),
            (self.refine_steps >= 0, "refine_steps must be >= 0"),
            (self.features >= 0, "features (the feature-matching weight) must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise LabellessError(message)


@dataclass
class RetrainResult:
    model: nn.Module
    before: dict[str, float]  # held-out figures of the starting model
    after: dict[str, float]  # held-out figures of the model handed back
    best_epoch: int  # 0: the starting model was best
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # training time, evaluation excluded
    images_per_second: float = 0.0
    trainable_parameters: int = 0
    skipped: str | None = None  # why nothing was trained (the model is handed back unchanged)

    def summary(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["model"]
        return data


def trainable_parameters(student: nn.Module, tune_centroids: bool = False) -> list[nn.Parameter]:
    """Freeze the quantized tensors (centroids too, unless tuned); everything else trains."""
    centroids = {id(qt.centroids) for qt in quantized_tensors(student).values()}
    params = []
    for param in student.parameters():
        frozen = id(param) in centroids and not tune_centroids
        param.requires_grad_(not frozen)
        if not frozen:
            params.append(param)
    return params


def retrain(
    student: nn.Module,
    objective: Objective | nn.Module,
    data: torch.utils.data.Dataset,
    preprocess: nn.Module,
    *,
    config: RetrainConfig = RetrainConfig(),
    checkpoint_dir: str | Path | None = None,
    device: torch.device | None = None,
) -> RetrainResult:
    """Train ``student``'s non-quantized parameters under ``objective``.

    ``objective`` is a teacher module (label-free: :class:`~labelless.objectives.Distillation`
    of its outputs on the unlabelled ``data``) or an :class:`~labelless.objectives.Objective`,
    such as :class:`~labelless.objectives.CrossEntropy` for the labelled baseline.

    Example:
        >>> result = retrain(quantized, original, open_images("mnist", size=32).unlabeled(),
        ...                  Preprocess.for_spec(spec), checkpoint_dir="ckpt")
        >>> labelled = retrain(quantized, CrossEntropy(), open_images("fashion-mnist", labeled=True), preprocess)

    When every parameter is quantized (and centroids are not tuned) there is nothing to train:
    ``student`` comes back unchanged, with ``skipped`` saying so.
    """
    objective = as_objective(objective)
    params = trainable_parameters(student, config.tune_centroids)
    if not params:
        log.warning("%s: the model is handed back unchanged (tune_centroids would learn the codebooks)",
                    NOTHING_TO_RETRAIN)
        return RetrainResult(model=student, before={}, after={}, best_epoch=0, skipped=NOTHING_TO_RETRAIN)
    n_images = len(data)  # under 2 images the trainer says what is wrong with the data
    too_few = n_images >= 2 and too_few_held_out(_holdout_size(n_images, config.holdout), config.min_holdout,
                                                 config.holdout)
    if too_few:
        log.warning("retraining skipped: %s", too_few)
        return RetrainResult(model=student, before={}, after={}, best_epoch=0, skipped=too_few)
    on = device or next(student.parameters()).device
    data = objective.prepare(data, preprocess, config, on)
    return _Trainer(student, params, objective, data, preprocess, config, checkpoint_dir, on).run()


class _Trainer:
    """One retraining run: data order, the objective's loss, holdout selection and checkpoints."""

    def __init__(self, student, params, objective, dataset, preprocess, config, checkpoint_dir, device):
        self.device, self.config, self.objective = device, config, objective
        self.student = self.place(student)
        self.preprocess = preprocess.to(self.device)
        self.source = batch_source(dataset, objective.needs_labels)
        self.train_idx, self.hold_idx = _split(len(self.source), config.holdout, config.seed)
        self.params = params  # the student's own parameters: placing it on the device moved them in place
        self.optimizer = _optimizer(self.student, self.params, config)
        self.model = distributed.wrap(self.student, self.device, broadcast_buffers=config.bn == BatchNorm.UPDATE)
        self.path = None if checkpoint_dir is None else Path(checkpoint_dir) / f"retrain-{objective.kind}.ckpt"
        self.history: list[dict[str, float]] = []

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` on this run's device (channels-last on CUDA)."""
        model = model.to(self.device)
        if self.device.type == "cuda" and self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def run(self) -> RetrainResult:
        weights = self.objective.begin(self)
        try:
            state = self._train(self.objective.reference(self, self.hold_idx), weights)
        finally:
            self.objective.end()
        self.student.load_state_dict(state["best"]["state"], strict=False)
        seconds = state["seconds"]
        return RetrainResult(
            model=self.student.eval(),
            before=state["before"],
            after=state["best"]["figures"],
            best_epoch=state["best"]["epoch"],
            history=self.history,
            seconds=seconds,
            images_per_second=state["images"] / seconds if seconds else 0.0,
            trainable_parameters=sum(p.numel() for p in self.params),
        )

    def _train(self, hold: torch.Tensor, weights: torch.Tensor | None) -> dict[str, Any]:
        """Every epoch not done yet; the kept state moves to an epoch only when it is significantly
        better on the held-out images than the state kept so far."""
        state = self._resume(hold)
        first = state["epoch"] + 1
        for epoch in range(first, self.config.epochs + 1):
            start = time.perf_counter()
            loss, n = self._epoch(epoch, weights)
            state.update(epoch=epoch, seconds=state["seconds"] + time.perf_counter() - start,
                         images=state["images"] + n)
            figures, evidence = self._score(hold)
            self.history.append({"epoch": epoch, "loss": loss, **figures})
            if significantly_better(evidence, Evidence.from_dict(state["best"]["evidence"])):
                state["best"] = {"epoch": epoch, "figures": figures, "evidence": evidence.to_dict(),
                                 "state": self._trainable_state()}
            self._save(state)
        return state

    # -- one epoch ---------------------------------------------------------------------

    def _epoch(self, epoch: int, weights: torch.Tensor | None) -> tuple[float, int]:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        order = distributed.sampler_shard(_order(self.train_idx, weights, generator))  # this rank's share
        self.model.train(self.config.bn == BatchNorm.UPDATE)
        total, count = 0.0, 0
        batches = order.split(self.config.batch_size)
        desc = f"retrain ({self.objective.kind}) epoch {epoch}/{self.config.epochs}"
        for batch_idx in progress(batches, desc=desc, unit="batch"):
            loss = self._step(batch_idx, generator)
            if distributed.world_size() > 1:  # every rank sees the same mean, so all stop together
                loss = distributed.mean(torch.tensor(loss, dtype=torch.float64, device=self.device)).item()
            if not math.isfinite(loss):
                raise LabellessError(
                    f"the loss became {loss} in epoch {epoch}; the last good checkpoint is kept"
                    f"{f' in {self.path}' if self.path else ''}: try a lower --lr"
                )
            total, count = total + loss * len(batch_idx), count + len(batch_idx)
        if self.config.bn == BatchNorm.UPDATE:  # DDP gave every forward rank 0's statistics; the last too
            distributed.broadcast_tensors(v for k, v in self.student.named_buffers() if _is_bn_statistic(k))
        return total / max(count, 1), count * distributed.world_size()

    def _step(self, batch_idx: torch.Tensor, generator: torch.Generator) -> float:
        images, labels = self.source.batch(batch_idx)
        x = self.input(images)
        chance = self.objective.mixes(self.config)
        mixed = chance > 0 and torch.rand((), generator=generator).item() < chance
        if mixed:
            x = _cutmix(x, generator)
        with autocast(self.device, self.config.amp):
            output = self.model(x).float()
            loss = self.objective.loss(self, output, x, batch_idx, labels, mixed)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def input(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of uint8 images, preprocessed on this run's device."""
        x = self.preprocess(images.to(self.device, non_blocking=True))
        if self.device.type == "cuda" and self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # -- held-out scores -----------------------------------------------------------------

    @torch.no_grad()
    def _outputs(self, indices: torch.Tensor) -> torch.Tensor:
        """The student's logits on ``indices``: each rank its block, gathered in order."""
        self.student.eval()
        chunks = []
        for batch_idx in indices[distributed.block(len(indices))].split(256):
            with autocast(self.device, self.config.amp):
                chunks.append(self.student(self.input(self.source.batch(batch_idx)[0])).float().cpu())
        return distributed.gather_blocks(_cat(chunks))

    def _score(self, hold: torch.Tensor) -> tuple[dict[str, float], Evidence]:
        """The held-out figures and the per-image evidence that epoch selection weighs."""
        outputs = self._outputs(self.hold_idx)
        return self.objective.score(outputs, hold), self.objective.evidence(outputs, hold)

    # -- state and checkpoints -----------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(p) for p in self.params}
        state = {k: v.detach().clone() for k, v in self.student.named_parameters() if id(v) in names}
        if self.config.bn == BatchNorm.UPDATE:
            state.update({k: v.detach().clone() for k, v in self.student.named_buffers() if _is_bn_statistic(k)})
        return state

    def _resume(self, hold: torch.Tensor) -> dict[str, Any]:
        """The last checkpoint of this very run if there is one (read by rank 0, sent to all)."""
        fresh = self._fresh_state(hold)
        saved = distributed.broadcast_object(self._load(fresh["identity"]) if distributed.is_main() else None)
        if saved is None:
            return fresh
        self.student.load_state_dict(saved["current"], strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.history = saved["history"]
        log.info("resuming %s retraining after epoch %d (checkpoint of %d process(es))", self.objective.kind, saved["epoch"],
                 saved.get("world_size", 1))
        return saved

    def _load(self, identity: str) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("ignoring unreadable checkpoint %s (%s)", self.path, type(exc).__name__)
            return None
        if saved.get("identity") != identity or saved.get("epoch", 0) > self.config.epochs:
            log.warning("checkpoint %s is from other settings: starting again", self.path)
            return None
        return saved

    def _fresh_state(self, hold: torch.Tensor) -> dict[str, Any]:
        before, evidence = self._score(hold)
        return {
            "identity": _identity(self.config, self.objective.kind, (self.student, self.objective.teacher),
                                  _data_digest(self.source, self.preprocess)),
            "epoch": 0,
            "seconds": 0.0,
            "images": 0,
            "before": before,
            "best": {"epoch": 0, "figures": before, "evidence": evidence.to_dict(), "state": self._trainable_state()},
        }

    def _save(self, state: dict[str, Any]) -> None:
        """Rank 0 writes the checkpoint: the plain student's tensors (no DDP ``module.`` prefix)."""
        if self.path is None or not distributed.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(state, current=self._trainable_state(), optimizer=self.optimizer.state_dict(), history=self.history,
                       world_size=distributed.world_size())
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)


def _identity(config: RetrainConfig, kind: str, models: tuple[nn.Module, nn.Module | None], data: str) -> str:
    """What a checkpoint must match to be resumed: the settings (the number of epochs aside: the
    state after epoch e does not depend on it), the data and its preprocessing (``data``, see
    :func:`_data_digest`) and the starting models' bytes."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "epochs"}
    states = [None if model is None else state_digest(model) for model in models]
    payload = json.dumps({"config": settings, "kind": kind, "data": data, "models": states}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _data_digest(source: ImageSet | DatasetImages, preprocess: nn.Module, n_sampled: int = 64) -> str:
    """A fingerprint of the retraining data: its size, ``n_sampled`` images spread over it (with
    their labels) and the preprocessing (normalisation, size), so that a checkpoint is never
    resumed on other images or other normalisation."""
    digest = hashlib.sha256(str(len(source)).encode())
    images, labels = source.batch(torch.linspace(0, len(source) - 1, n_sampled).round().long().unique())
    for tensor in (images, labels, *preprocess.buffers()):
        if tensor is not None:
            digest.update(tensor_bytes(tensor))
    digest.update(repr(getattr(preprocess, "size", None)).encode())
    return digest.hexdigest()


def _is_bn_statistic(name: str) -> bool:
    return "running" in name or "num_batches" in name


def _cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(chunks) if chunks else torch.empty(0)


def _optimizer(student: nn.Module, params: list[nn.Parameter], config: RetrainConfig) -> torch.optim.Optimizer:
    centroids = {id(qt.centroids) for qt in quantized_tensors(student).values()}
    groups = [
        {"params": [p for p in params if id(p) not in centroids], "lr": config.lr},
        {"params": [p for p in params if id(p) in centroids], "lr": config.centroid_lr},
    ]
    return torch.optim.Adam([g for g in groups if g["params"]], weight_decay=config.weight_decay)


def _split(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, holdout) index split; the holdout gets at least one image."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = _holdout_size(n, holdout)
    if n_hold == 0:
        raise LabellessError("retraining needs at least 2 images (some are held out to pick the best epoch)")
    return order[n_hold:].sort().values, order[:n_hold].sort().values


def _holdout_size(n: int, holdout: float) -> int:
    """Images the split holds out of ``n``: at least one, and one left to train on."""
    return min(max(1, round(n * holdout)), n - 1) if n > 1 else 0


def _order(indices: torch.Tensor, weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    if weights is None:
        return indices[torch.randperm(indices.numel(), generator=generator)]
    draws = torch.multinomial(weights, indices.numel(), replacement=True, generator=generator)
    return indices[draws]


def _cutmix(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Paste a random box of a shuffled copy of the batch into every image."""
    n, _, h, w = x.shape
    lam = torch.rand((), generator=generator).item()  # Beta(1, 1): the kept fraction of each image
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy = int(torch.randint(h, (), generator=generator))
    cx = int(torch.randint(w, (), generator=generator))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    perm = torch.randperm(n, generator=generator).to(x.device)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    return mixed

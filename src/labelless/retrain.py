"""Label-free retraining (and the labelled baseline it is compared with).

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
* ``cutmix=0.5``: half the batches are CutMix-ed; teacher and student see the same images.
* ``refine_steps=0``: off by default (it costs a forward and backward pass of the teacher per
  image and step). For images from another domain, ``refine_steps=50`` first pulls them
  toward the teacher's BatchNorm statistics (:mod:`labelless.refine`); measured on a ResNet-18
  at 93% size reduction distilled on MNIST digits: 67.9% -> 80.6% (docs/DEMO.md).
* ``features=0``: logits only by default. ``features=w`` adds ``w`` times the normalised
  squared error between every layer's output and the teacher's on the same images
  (:mod:`labelless.features`); the teacher then runs on every batch.
* part of the unlabelled data is held out; the state with the best agreement with the
  teacher on it is kept, so retraining never hands back a model worse than it started.

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
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import LabellessError
from .evaluate import agreement, autocast, kl_divergence
from .features import FeatureTaps, feature_loss, tap_names
from .io import atomic_path
from .models import state_digest, tensor_bytes
from .progress import progress
from .quantize import quantized_tensors
from .refine import refine_images

__all__ = ["RetrainConfig", "RetrainResult", "retrain", "retrain_labeled", "trainable_parameters"]

log = logging.getLogger(__name__)

NOTHING_TO_RETRAIN = "every parameter is quantized, so nothing is left to retrain"


@dataclass(frozen=True)
class RetrainConfig:
    """How to retrain; every field is a CLI flag of ``labelless retrain``."""

    epochs: int = 5
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0
    batch_size: int = 128
    loss: str = "kl"  # "kl" (temperature-softened softmax) or "mse" (on logits)
    temperature: float = 1.0
    bn: str = "frozen"  # "frozen": BatchNorm statistics stay; "update": re-estimated
    balance: bool = True  # resample so the teacher's predicted classes are balanced
    cutmix: float = 0.5  # probability that a batch is CutMix-ed (0 turns it off)
    holdout: float = 0.1  # fraction of the images held out to pick the best epoch
    tune_centroids: bool = False  # also learn codebook values (indices fixed)
    centroid_lr: float = 1e-4
    refine_steps: int = 0  # label-free only: Adam steps pulling the images toward the teacher's BN statistics
    features: float = 0.0  # label-free only: weight of matching every layer's output to the teacher's (0: off)
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, "epochs must be >= 0"),
            (self.lr > 0 and self.centroid_lr > 0, "learning rates must be > 0"),
            (self.batch_size >= 1, "batch size must be >= 1"),
            (self.loss in ("kl", "mse"), f"loss must be kl or mse, got {self.loss!r}"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.bn in ("frozen", "update"), f"bn must be frozen or update, got {self.bn!r}"),
            (0 <= self.cutmix <= 1, "cutmix is a probability in [0, 1]"),
            (0 < self.holdout < 1, "holdout is a fraction in (0, 1)"),
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
    teacher: nn.Module,
    unlabeled: torch.utils.data.Dataset,
    preprocess: nn.Module,
    *,
    config: RetrainConfig = RetrainConfig(),
    checkpoint_dir: str | Path | None = None,
    device: torch.device | None = None,
) -> RetrainResult:
    """Train ``student``'s non-quantized parameters to match ``teacher`` on unlabelled images.

    Example:
        >>> result = retrain(quantized, original, open_images("mnist", size=32).unlabeled(),
        ...                  Preprocess.for_spec(spec), checkpoint_dir="ckpt")
        >>> result.after["agreement"] >= result.before["agreement"]
        True

    With ``config.refine_steps`` the images are first pulled toward the teacher's training
    domain (:func:`labelless.refine.refine_images`): for unlabelled data from another domain.
    """
    if config.refine_steps:
        on = device or next(student.parameters()).device
        unlabeled = refine_images(teacher, unlabeled, preprocess, config.refine_steps, device=on)
    return _Trainer(student, teacher, unlabeled, preprocess, config, checkpoint_dir, device, labeled=False).run()


def retrain_labeled(
    student: nn.Module,
    labeled: torch.utils.data.Dataset,
    preprocess: nn.Module,
    *,
    config: RetrainConfig = RetrainConfig(),
    checkpoint_dir: str | Path | None = None,
    device: torch.device | None = None,
) -> RetrainResult:
    """The conventional baseline: the same frozen tensors, cross-entropy on labels."""
    config = dataclasses.replace(config, balance=False)
    return _Trainer(student, None, labeled, preprocess, config, checkpoint_dir, device, labeled=True).run()


class _Trainer:
    """One retraining run: data order, loss, holdout selection and checkpoints."""

    def __init__(self, student, teacher, dataset, preprocess, config, checkpoint_dir, device, labeled):
        self.device = device or next(student.parameters()).device
        self.config, self.labeled = config, labeled
        self.student = _on_device(student, self.device, config)
        self.teacher = None if teacher is None else _on_device(teacher, self.device, config).eval()
        self.preprocess = preprocess.to(self.device)
        self.source = _ImageSource(dataset, labeled)
        self.train_idx, self.hold_idx = _split(len(self.source), config.holdout, config.seed)
        self.params = trainable_parameters(self.student, config.tune_centroids)
        if not self.params:
            raise LabellessError(f"{NOTHING_TO_RETRAIN}: quantize fewer layers or pass --tune-centroids")
        self.optimizer = _optimizer(self.student, self.params, config)
        self.model = distributed.wrap(self.student, self.device, broadcast_buffers=config.bn == "update")
        self.path = None if checkpoint_dir is None else Path(checkpoint_dir) / f"retrain-{self.kind}.ckpt"
        self.history: list[dict[str, float]] = []
        self.taps = None
        if config.features and not labeled:
            names = tap_names(self.student)
            self.taps = (FeatureTaps(self.student, names), FeatureTaps(self.teacher, names))

    @property
    def kind(self) -> str:
        return "labeled" if self.labeled else "labelfree"

    def run(self) -> RetrainResult:
        targets = None if self.labeled else self._teacher_logits()
        hold = self._holdout_reference(targets)
        weights = _balance_weights(targets[self.train_idx]) if self.config.balance and targets is not None else None
        state = self._resume(hold)
        seconds, images = state["seconds"], state["images"]
        for epoch in progress(range(state["epoch"] + 1, self.config.epochs + 1), desc=f"retrain ({self.kind})", unit="epoch"):
            start = time.perf_counter()
            loss, n = self._epoch(epoch, targets, weights)
            seconds, images = seconds + time.perf_counter() - start, images + n
            figures = self._score(hold)
            self.history.append({"epoch": epoch, "loss": loss, **figures})
            if _better(figures, state["best"]["figures"], self.labeled):
                state["best"] = {"epoch": epoch, "figures": figures, "state": self._trainable_state()}
            state.update(epoch=epoch, seconds=seconds, images=images)
            self._save(state)
        self.student.load_state_dict(state["best"]["state"], strict=False)
        for taps in self.taps or ():
            taps.close()
        return RetrainResult(
            model=self.student.eval(),
            before=state["before"],
            after=state["best"]["figures"],
            best_epoch=state["best"]["epoch"],
            history=self.history,
            seconds=seconds,
            images_per_second=images / seconds if seconds else 0.0,
            trainable_parameters=sum(p.numel() for p in self.params),
        )

    # -- one epoch ---------------------------------------------------------------------

    def _epoch(self, epoch: int, targets: torch.Tensor | None, weights: torch.Tensor | None) -> tuple[float, int]:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        order = distributed.sampler_shard(_order(self.train_idx, weights, generator))  # this rank's share
        self._set_modes()
        total, count = 0.0, 0
        for batch_idx in order.split(self.config.batch_size):
            loss = self._step(batch_idx, targets, generator)
            if distributed.world_size() > 1:  # every rank sees the same mean, so all stop together
                loss = distributed.mean(torch.tensor(loss, dtype=torch.float64, device=self.device)).item()
            if not math.isfinite(loss):
                raise LabellessError(
                    f"the loss became {loss} in epoch {epoch}; the last good checkpoint is kept"
                    f"{f' in {self.path}' if self.path else ''}: try a lower --lr"
                )
            total, count = total + loss * len(batch_idx), count + len(batch_idx)
        if self.config.bn == "update":  # DDP gave every forward rank 0's statistics; the last too
            distributed.broadcast_tensors(v for k, v in self.student.named_buffers() if _is_bn_statistic(k))
        return total / max(count, 1), count * distributed.world_size()

    def _step(self, batch_idx: torch.Tensor, targets: torch.Tensor | None, generator: torch.Generator) -> float:
        images, labels = self.source.batch(batch_idx)
        x = self._input(images)
        mixed = not self.labeled and torch.rand((), generator=generator).item() < self.config.cutmix
        if mixed:
            x = _cutmix(x, generator)
        with autocast(self.device, self.config.amp):
            output = self.model(x).float()
            if self.labeled:
                loss = F.cross_entropy(output, labels.to(self.device))
            else:
                fresh = mixed or self.taps is not None  # the teacher runs on this very batch
                target = self._teacher(x) if fresh else targets[batch_idx].to(self.device)
                loss = _distillation_loss(output, target, self.config)
                if self.taps is not None:
                    loss = loss + self.config.features * feature_loss(self.taps[0].outputs, self.taps[1].outputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.to(self.device, non_blocking=True))
        if self.device.type == "cuda" and self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.config.amp):
            return self.teacher(x).float()

    def _set_modes(self) -> None:
        self.model.train(self.config.bn == "update")

    # -- reference outputs and scores ----------------------------------------------------

    @torch.no_grad()
    def _teacher_logits(self) -> torch.Tensor:
        """The teacher's logits on every image, computed once (for balancing and caching);
        under torchrun each rank computes its block of the images and the blocks are gathered."""
        mine = torch.arange(len(self.source))[distributed.block(len(self.source))]
        chunks = []
        for batch_idx in progress(mine.split(256), desc="teacher outputs"):
            chunks.append(self._teacher(self._input(self.source.batch(batch_idx)[0])).cpu())
        return distributed.gather_blocks(_cat(chunks))

    @torch.no_grad()
    def _outputs(self, indices: torch.Tensor) -> torch.Tensor:
        """The student's logits on ``indices``: each rank its block, gathered in order."""
        self.student.eval()
        chunks = []
        for batch_idx in indices[distributed.block(len(indices))].split(256):
            with autocast(self.device, self.config.amp):
                chunks.append(self.student(self._input(self.source.batch(batch_idx)[0])).float().cpu())
        return distributed.gather_blocks(_cat(chunks))

    def _holdout_reference(self, targets: torch.Tensor | None) -> torch.Tensor:
        if self.labeled:
            return self.source.labels(self.hold_idx)
        return targets[self.hold_idx]

    def _score(self, hold: torch.Tensor) -> dict[str, float]:
        output = self._outputs(self.hold_idx)
        if self.labeled:
            return {"accuracy": 100.0 * (output.argmax(1) == hold).float().mean().item()}
        return {"agreement": agreement(output, hold), "kl": kl_divergence(hold, output)}

    # -- state and checkpoints -----------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(p) for p in self.params}
        state = {k: v.detach().clone() for k, v in self.student.named_parameters() if id(v) in names}
        if self.config.bn == "update":
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
        log.info("resuming %s retraining after epoch %d (checkpoint of %d process(es))", self.kind, saved["epoch"],
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
        before = self._score(hold)
        return {
            "identity": _identity(self.config, self.kind, (self.student, self.teacher),
                                  _data_digest(self.source, self.preprocess)),
            "epoch": 0,
            "seconds": 0.0,
            "images": 0,
            "before": before,
            "best": {"epoch": 0, "figures": before, "state": self._trainable_state()},
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


def _data_digest(source: _ImageSource, preprocess: nn.Module, n_sampled: int = 64) -> str:
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


def _better(new: dict[str, float], old: dict[str, float], labeled: bool) -> bool:
    if labeled:
        return new["accuracy"] > old["accuracy"]
    return (new["agreement"], -new["kl"]) > (old["agreement"], -old["kl"])


class _ImageSource:
    """Batches of uint8 images (and labels, for the labelled baseline) by index."""

    def __init__(self, dataset: torch.utils.data.Dataset, labeled: bool):
        self.dataset, self.labeled = dataset, labeled
        self.images = getattr(dataset, "images", None)  # in-memory sources: index directly
        self.targets = getattr(dataset, "labels", None) if labeled else None
        if len(dataset) == 0:
            raise LabellessError("the retraining data is empty: give it some images")

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.images is not None and not self.labeled:
            return self.images[indices], None
        if self.images is not None and self.targets is not None:
            return self.images[indices], self.targets[indices]
        items = [self.dataset[int(i)] for i in indices]
        if self.labeled:
            return torch.stack([img for img, _ in items]), torch.tensor([int(y) for _, y in items])
        return torch.stack(items), None

    def labels(self, indices: torch.Tensor) -> torch.Tensor:
        if self.targets is not None:
            return self.targets[indices]
        return torch.tensor([int(self.dataset[int(i)][1]) for i in indices])


def _on_device(model: nn.Module, device: torch.device, config: RetrainConfig) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda" and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


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
    n_hold = min(max(1, round(n * holdout)), n - 1) if n > 1 else 0
    if n_hold == 0:
        raise LabellessError("retraining needs at least 2 images (some are held out to pick the best epoch)")
    return order[n_hold:].sort().values, order[:n_hold].sort().values


def _balance_weights(logits: torch.Tensor) -> torch.Tensor:
    """Per-image sampling weights that balance the teacher's predicted classes."""
    predicted = logits.argmax(1)
    counts = torch.bincount(predicted, minlength=logits.shape[1]).float()
    return 1.0 / counts[predicted]


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


def _distillation_loss(student: torch.Tensor, teacher: torch.Tensor, config: RetrainConfig) -> torch.Tensor:
    if config.loss == "mse":
        return F.mse_loss(student, teacher)
    t = config.temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean") * t * t

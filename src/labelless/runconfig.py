"""The configuration of ``labelless run``: frozen sections, each validating its own values.

``RunConfig`` is what a YAML config maps onto (:func:`labelless.config.from_mapping`); every
field carries its help text (``labelless run --print-config`` prints them as comments). A
config is checked in two steps: its values when it is built (``__post_init__``, so a config
made in Python is checked as one read from YAML), and what it names on this machine (files,
datasets, device, output folder) by :meth:`RunConfig.check`, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .config import coerce_choices, from_mapping, option
from .data import check_spec
from .errors import LabellessError
from .evaluate import check_device
from .fileformat import Entropy
from .io import check_input_file, is_writable_folder
from .layers import list_layers
from .models import ModelSpec, build_model, check_input_size, weights_file
from .plan import load_plan
from .retrain import RetrainConfig
from .search import LabelFreeMetric, size_budget
from .sensitivity import SweepConfig
from .train import TrainConfig

__all__ = ["RunConfig", "ModelSection", "TeacherSection", "DataSection", "SweepSection", "QuantizeSection",
           "SearchSection", "StorageSection", "CONFIG_VERSION"]


def _at_least_one(name: str, value: int | None, nullable: str = "", least: int = 1) -> None:
    """A one-line error unless ``value`` is a whole number >= ``least`` (or None, when ``nullable``
    says what null means)."""
    if value is None and nullable:
        return
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value < least:
        null = f" (or null for {nullable})" if nullable else ""
        raise LabellessError(f"{name} must be a whole number >= {least}{null}, got {value!r}")


def _at_least_zero(name: str, value: int) -> None:
    _at_least_one(name, value, least=0)


def _limit(name: str, value: int | None) -> None:
    _at_least_one(name, value, nullable="all images")


CONFIG_VERSION = 1  # of RunConfig's layout; a config of another version is refused, clearly


@dataclass(frozen=True)
class ModelSection:
    name: str = option("resnet18", 'torchvision classifier')
    num_classes: int = option(10, 'classes the classifier predicts')
    in_channels: int = option(1, 'input channels: 1 for grayscale, 3 for RGB')
    small_input: bool = option(False, 'stem for 28-32 px images (no early downsampling)')
    image_size: int = option(28, 'input height = width, in pixels')
    weights: str | None = option(None, 'checkpoint of the original model; null trains one (teacher section)')
    mean: tuple[float, ...] = option((), 'per-channel normalisation mean it was trained with (empty: stored in the weights, else ImageNet)')
    std: tuple[float, ...] = option((), 'per-channel standard deviation of that normalisation')

    def spec(self, mean: tuple[float, ...] = (), std: tuple[float, ...] = ()) -> ModelSpec:
        """The :class:`ModelSpec` of this section (every field but ``weights`` is one of its), fed
        ``mean``/``std`` (empty: ImageNet's)."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("weights", "mean", "std")}
        return ModelSpec(**shared, mean=tuple(mean), std=tuple(std))


@dataclass(frozen=True)
class TeacherSection:
    data: str = option("fashion-mnist", 'labelled training data, train split')
    limit: int | None = option(None, 'training images used (null: all)')
    train: TrainConfig = option(TrainConfig(epochs=4), 'how the teacher is trained (when model.weights is null)')

    def __post_init__(self) -> None:
        _limit("teacher.limit", self.limit)


@dataclass(frozen=True)
class DataSection:
    unlabeled: str = option("mnist", 'the label-free retraining set (train split)')
    unlabeled_limit: int | None = option(2000, 'images of it used (null: all)')
    test: str | None = option("fashion-mnist", 'labelled evaluation set (test split); null: no label anywhere, '
                                               'every model scored by agreement and KL with the original on '
                                               'unlabelled images held apart from every other stage')
    test_limit: int | None = option(None, 'test images scored (null: all; with test null, the held-apart ones)')
    baseline: str | None = option("fashion-mnist", 'labelled retraining set of the baseline (train split); '
                                                   'null: no baseline')
    baseline_limit: int | None = option(2000, 'images of it used (null: all)')

    def __post_init__(self) -> None:
        for name in ("unlabeled_limit", "test_limit", "baseline_limit"):
            _limit(f"data.{name}", getattr(self, name))
        for name, null in (("unlabeled", ""), ("test", " (null: no labelled evaluation)"),
                           ("baseline", " (null: no labelled baseline)")):
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                raise LabellessError(f"data.{name} is empty: give a dataset spec{null}")
        if self.test is None and self.unlabeled_limit is None:
            raise LabellessError("data.test is null, so models are scored on unlabelled images held apart from "
                                 "retraining's, but data.unlabeled_limit is null (retraining uses them all): "
                                 "set data.unlabeled_limit below the number of unlabelled images")


@dataclass(frozen=True)
class SweepSection(SweepConfig):
    """The sweep's own settings (:class:`SweepConfig`, embedded) and the run's images for it."""

    clusters: tuple[int, ...] = option((1, 2, 4, 8, 16, 32), 'values of k tried for every tensor (the run '
                                                             'stops at 32, the command at 256)')
    limit: int = option(256, 'unlabelled images the sweep and search measure on')
    importance: bool = option(True, 'weight the k-means by Fisher importance on the unlabelled images')
    importance_images: int = option(512, 'images the importance is averaged over')

    def __post_init__(self) -> None:
        super().__post_init__()  # clusters, batch size and granularities, checked where the sweep checks them
        _at_least_one("sweep.limit", self.limit)
        _at_least_one("sweep.importance_images", self.importance_images)

    def config(self) -> SweepConfig:
        """The plain :class:`SweepConfig` in this section (what the sweep's journal is keyed on)."""
        return SweepConfig(**{f.name: getattr(self, f.name) for f in fields(SweepConfig)})


@dataclass(frozen=True)
class QuantizeSection:
    """How the searched plan is applied, on the unlabelled images (no label read)."""

    compensate: bool = option(True, "GPTQ-style indices: each layer's output moves least (same codebooks, same bytes)")
    correct_bn: bool = option(False, "BatchNorm statistics moved by the quantization's shift: for same-domain images only")
    images: int = option(512, 'unlabelled images both measure on')

    def __post_init__(self) -> None:
        _at_least_one("quantize.images", self.images)


@dataclass(frozen=True)
class SearchSection:
    max_drop: float | None = option(None, 'points of search.metric the plan may cost (null: no such budget)')
    metric: LabelFreeMetric = option(LabelFreeMetric.AGREEMENT,
                                     'what the drop is measured in, both label-free: top-1 agreement with the '
                                     'teacher, or balanced: that agreement averaged over the classes the teacher '
                                     'predicts (for images where it calls most of them one class)')
    plan: str | None = option(None, 'a fixed plan file instead of sweep + search')
    max_bytes: int | None = option(None, 'size budget of the file')
    smaller_by: float | None = option(0.96, 'size budget as the share of the fp32 size saved (0.96: 96% smaller; '
                                            'null: no size budget)')
    after_retraining: int = option(2, 'plans nearest the answer judged again after a short label-free retraining '
                                      '(0: judge them as quantized)')
    retrain_images: int = option(1000, 'unlabelled images of that short retraining, held apart from the sweep\'s')
    retrain_epochs: int = option(1, 'epochs of that short retraining')
    as_shipped: bool = option(True, 'measure each plan as the run ships it, compensated and BatchNorm-corrected as '
                                    'the quantize section says (one compensation per plan measured); false: with '
                                    'nearest-centroid indices (faster, but blind to what compensation wins back)')

    def __post_init__(self) -> None:
        _at_least_zero("search.after_retraining", self.after_retraining)
        _at_least_one("search.retrain_images", self.retrain_images)
        _at_least_one("search.retrain_epochs", self.retrain_epochs)
        if self.plan is None and self.max_drop is None and self.max_bytes is None and self.smaller_by is None:
            raise LabellessError("search needs a budget: max_drop, max_bytes or smaller_by (or a fixed plan)")
        if self.smaller_by is not None:
            size_budget(1, self.smaller_by)  # one-line error when it is not a fraction in [0, 1)
        coerce_choices(self)  # labelless run sweeps without labels: agreement or balanced, never accuracy
        if self.max_bytes is not None:
            _at_least_one("search.max_bytes", self.max_bytes)
        if self.max_drop is not None and self.max_drop < 0:
            raise LabellessError(f"search.max_drop must be >= 0 points, got {self.max_drop}")


@dataclass(frozen=True)
class StorageSection:
    entropy: Entropy = option(Entropy.ANS, 'index coding in the file: ans (entropy-coded) or none (bit-packed)')
    fp16_codebooks: bool = option(False, "store codebooks in float16 (half their bytes)")
    fp16_dense: bool = option(False, "store the tensors left unquantized in float16")

    def __post_init__(self) -> None:
        coerce_choices(self)


@dataclass(frozen=True)
class RunConfig:
    """Everything ``labelless run`` does; the YAML config mirrors these sections."""

    version: int = option(CONFIG_VERSION, "format of this config (labelless reads this version)")
    model: ModelSection = option(ModelSection(), 'the network to compress')
    teacher: TeacherSection = option(TeacherSection(), 'how the original model is trained when no weights are given')
    data: DataSection = option(DataSection(), 'where the images come from (dataset specs, see README)')
    sweep: SweepSection = option(SweepSection(), 'the per-layer sensitivity sweep')
    search: SearchSection = option(SearchSection(), 'the plan search and its budget')
    quantize: QuantizeSection = option(QuantizeSection(), 'how the plan is applied')
    retrain: RetrainConfig = option(RetrainConfig(epochs=5, refine_steps=20, tune_centroids=True),
                                    "label-free retraining (the same fields as labelless retrain's flags)")
    baseline: bool = option(True, 'also run conventional labelled retraining, for comparison (only with '
                                  'data.test and data.baseline set)')
    storage: StorageSection = option(StorageSection(), 'how the .lless file is stored')
    device: str = option("auto", 'auto, cpu, cuda, cuda:1 ...')
    seed: int = option(0, 'seed of subsets and shuffling')
    out: str = option("runs/default", 'output folder')

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise LabellessError(f"config version {self.version} is not one this labelless reads ({CONFIG_VERSION}): "
                                 f"start from `labelless run --print-config`")

    @property
    def runs_baseline(self) -> bool:
        """Whether the labelled baseline runs: asked for, with labelled images to train it on and a
        labelled test set to compare it on (a run without ``data.test`` reads no label at all)."""
        return bool(self.baseline and self.data.baseline and self.data.test)

    @classmethod
    def from_data(cls, data: Any) -> "RunConfig":
        return from_mapping(cls, data, "run config")

    def check(self) -> None:
        """What the config names, on this machine, before any work: the model builds at its
        input size, the weights and datasets exist, the plan fits the model, the device is
        there and the output folder can be written. Raises :class:`LabellessError` naming the
        field and what to write instead."""
        spec = _check_model(self.model)
        _check_data(self)
        if self.search.plan:
            plan = load_plan(self.search.plan)
            plan.resolve(list_layers(build_model(spec, device="meta")))  # selectors out of range fail here
        check_device(self.device)
        _check_out(Path(self.out))


def _check_model(section: ModelSection) -> ModelSpec:
    spec = section.spec(section.mean, section.std)
    check_input_size(spec)
    if section.weights:
        check_input_file(weights_file(section.weights), "model.weights file")
    return spec


def _check_data(config: RunConfig) -> None:
    data = config.data
    specs = {"data.unlabeled": data.unlabeled, "data.test": data.test}
    if config.runs_baseline:
        specs["data.baseline"] = data.baseline
    if not config.model.weights:
        specs["teacher.data"] = config.teacher.data
    for field, spec in specs.items():
        if spec is None:
            continue
        try:
            check_spec(spec)
        except LabellessError as exc:
            raise LabellessError(f"run config {field}: {exc}") from None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LabellessError(f"run config out {str(out)!r} is a file: give a folder (it is created if missing)")
    existing = next(p for p in [out, *out.resolve().parents] if p.exists())
    if not existing.is_dir() or not is_writable_folder(existing):
        raise LabellessError(f"cannot create or write the output folder {str(out)!r} ({existing} is not writable): "
                             f"choose another out")

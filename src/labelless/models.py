"""Model names -> ``nn.Module``, and checkpoints -> weights, without executing pickle.

A :class:`ModelSpec` names a classifier -- torchvision's by default, timm's as ``timm:NAME``,
or the user's own as ``package.module:ClassName`` (see :mod:`labelless.zoo`) -- and the few
changes labelless makes to it (classes, input channels, a small-input stem for 28-32 px
images); it is what a ``.lless`` file records so that the model can be rebuilt.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from . import zoo
from .errors import ModelError
from .io import check_input_file
from .tvcheckpoints import TRANSFORM_INPUT_NORMALISATION, TRANSFORM_INPUT_WEIGHTS, adapt_state

__all__ = [
    "ModelSpec",
    "available_models",
    "build_model",
    "load_state_dict_file",
    "load_weights",
    "save_checkpoint",
    "state_digest",
    "tensor_bytes",
    "stored_normalisation",
    "check_input_size",
    "check_finite",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_CLASSES = 100_000
MAX_CHANNELS = 64
MAX_IMAGE_SIZE = 4096
_NO_SMALL_INPUT = ("googlenet", "inception", "vit_", "swin_", "maxvit")


@dataclass(frozen=True)
class ModelSpec:
    """A torchvision classifier and how labelless adapts it.

    Example:
        >>> spec = ModelSpec("resnet18", num_classes=10, in_channels=1, small_input=True)
        >>> model = build_model(spec)
    """

    name: str  # torchvision classifier, e.g. "resnet18", "vgg16_bn"
    num_classes: int = 1000  # outputs of the last layer
    in_channels: int = 3  # 1 for grayscale input
    small_input: bool = False  # stem for 28-32 px images (no early downsampling)
    image_size: int = 0  # input height = width; 0 means 32 with small_input, else 224
    mean: tuple[float, ...] = ()  # per-channel normalisation the model was trained with
    std: tuple[float, ...] = ()  # (empty: ImageNet's, repeated or averaged per channel)
    model_args: dict = dataclasses.field(default_factory=dict, hash=False)  # a custom model's constructor arguments

    def __post_init__(self) -> None:
        _check_int("num_classes", self.num_classes, 1, MAX_CLASSES)
        _check_int("in_channels", self.in_channels, 1, MAX_CHANNELS)
        _check_int("image_size", self.image_size, 0, MAX_IMAGE_SIZE)
        source = zoo.model_source(self.name)
        if source == "torchvision" and self.name not in available_models():
            raise ModelError(
                f"unknown model {self.name!r}: choose a torchvision classifier such as "
                f"resnet18, resnet50, vgg16_bn, mobilenet_v2 (`labelless models` lists them all), "
                f"timm:NAME or your own package.module:ClassName"
            )
        if not _plain_json(self.model_args):
            raise ModelError(f"model arguments must be a mapping of names to plain values (numbers, strings, "
                             f"lists, mappings with string keys; no NaN), got {self.model_args!r}")
        zoo.check_name(self.name, self.model_args)
        if self.small_input and (source != "torchvision" or self.name.startswith(_NO_SMALL_INPUT)):
            raise ModelError(f"{self.name} has no small-input stem: drop --small-input")
        if not self.image_size:
            object.__setattr__(self, "image_size", 32 if self.small_input else 224)
        for field in ("mean", "std"):
            object.__setattr__(self, field, self._normalisation(field))

    def _normalisation(self, field: str) -> tuple[float, ...]:
        given = tuple(float(v) for v in getattr(self, field))
        if not given:
            imagenet = IMAGENET_MEAN if field == "mean" else IMAGENET_STD
            given = imagenet if self.in_channels == 3 else (sum(imagenet) / 3,) * self.in_channels
        if len(given) != self.in_channels or (field == "std" and min(given) <= 0):
            raise ModelError(
                f"{field} needs {self.in_channels} value(s){' > 0' if field == 'std' else ''}, "
                f"got {list(given)}"
            )
        return given

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        if not self.model_args:
            del data["model_args"]  # files of torchvision and timm models read as before
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "ModelSpec":
        if not isinstance(data, dict):
            raise ModelError(f"an architecture must be a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ModelError(f"unknown architecture field(s) {sorted(unknown)}; valid: {sorted(fields)}")
        if not isinstance(data.get("name"), str):
            raise ModelError("an architecture needs a model name")
        for field in ("mean", "std"):
            values = data.get(field, ())
            if not isinstance(values, (list, tuple)) or not all(_finite_number(v) for v in values):
                raise ModelError(f"architecture field {field!r} must be a list of finite numbers")
        if not isinstance(data.get("small_input", False), bool):
            raise ModelError("architecture field 'small_input' must be true or false")
        try:
            return cls(**data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelError(f"bad architecture fields: {exc}") from None

    def example_input(self, batch: int = 1, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.zeros(batch, self.in_channels, self.image_size, self.image_size, device=device)


def _plain_json(value: Any) -> bool:
    """Whether ``value`` is a mapping that JSON stores and reads back as itself."""
    try:
        return isinstance(value, dict) and json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ModelError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")


_MODELS: list[str] | None = None


def available_models() -> list[str]:
    """The torchvision classifiers labelless can build."""
    global _MODELS
    if _MODELS is None:
        _MODELS = sorted(torchvision.models.list_models(module=torchvision.models))
    return _MODELS


def build_model(spec: ModelSpec, device: str | torch.device | None = None) -> nn.Module:
    """A freshly initialised model for ``spec`` (``device="meta"`` allocates nothing)."""
    source = zoo.model_source(spec.name)
    with torch.device(device or "cpu"):
        if source == "timm":
            model = zoo.build_timm(spec.name, spec.num_classes, spec.in_channels)
        elif source == "custom":
            model = zoo.build_custom(spec.name, spec.model_args)
        else:
            model = _torchvision_model(spec)
    model.labelless_spec = spec
    return model


def _torchvision_model(spec: ModelSpec) -> nn.Module:
    kwargs: dict[str, Any] = {"weights": None, "num_classes": spec.num_classes}
    if spec.name.startswith(("googlenet", "inception")):
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(spec.name, **kwargs)
    if spec.in_channels != 3:
        _replace_first_conv(model, in_channels=spec.in_channels)
    if spec.small_input:
        _small_input_stem(model, spec.name)
    return model


_TOO_SMALL = ("too small", "Kernel size can't be greater")


def check_input_size(spec: ModelSpec) -> None:
    """Raise :class:`ModelError` if ``spec.image_size`` is too small for the network's pooling.

    Runs the model on the meta device (no memory, no compute); a model that cannot be built or
    run there is not checked.

    Example:
        >>> check_input_size(ModelSpec("vgg16", image_size=16))
        Traceback (most recent call last):
        labelless.errors.ModelError: vgg16 cannot take 16x16 input ...
    """
    try:
        model = build_model(spec, device="meta").eval()
        with torch.no_grad():
            model(spec.example_input(device="meta"))
    except RuntimeError as exc:
        if any(text in str(exc) for text in _TOO_SMALL):
            size = spec.image_size
            stem = zoo.model_source(spec.name) == "torchvision" and not (
                spec.small_input or spec.name.startswith(_NO_SMALL_INPUT + ("vgg",)))
            hint = " or add --small-input" if stem else ""
            raise ModelError(f"{spec.name} cannot take {size}x{size} input ({_first_line(exc)}): "
                             f"give a larger --image-size{hint}") from None
    except Exception:  # noqa: BLE001 - a model that cannot run on meta is left to fail later, clearly
        return


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for fqn, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Conv2d):
                return module, child_name, child
    raise ModelError(f"{type(model).__name__} has no Conv2d stem to adapt")


def _replace_first_conv(model: nn.Module, in_channels: int | None = None, **changes: Any) -> None:
    parent, name, conv = _first_conv(model)
    config = dict(
        in_channels=in_channels or conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    config.update(changes)
    setattr(parent, name, nn.Conv2d(**config))


def _small_input_stem(model: nn.Module, name: str) -> None:
    # Keep 28-32 px images from shrinking to nothing in the first layers.
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        _replace_first_conv(model, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    elif name.startswith("densenet"):
        _replace_first_conv(model, kernel_size=3, stride=1, padding=1)
        model.features.pool0 = nn.Identity()
    elif name.startswith("shufflenet"):
        _replace_first_conv(model, stride=1)
        model.maxpool = nn.Identity()
    elif name.startswith("alexnet"):
        _replace_first_conv(model, kernel_size=3, stride=1, padding=1)
    elif not name.startswith("vgg"):  # VGG already works at 32 px; others: stride-1 stem
        _replace_first_conv(model, stride=1)


# -- checkpoints ---------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pt``/``.pth`` state_dict, never unpickling code.

    The usual wrappers are unwrapped: a ``state_dict``/``model`` key, a ``module.`` prefix.
    ``path`` may also be a folder holding ``model.safetensors`` (as Hugging Face writes them) or
    a torchvision weights name such as ``ResNet18_Weights.IMAGENET1K_V1``, read from the local
    torch hub cache (nothing is downloaded).
    """
    path = check_input_file(weights_file(path), "weights file", ModelError)
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        state = _read_torch(path)
    return _strip_prefixes(_unwrap(state, path))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The exact bytes of ``tensor``'s values, in row-major order."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_WEIGHTS_NAME = re.compile(r"\w+_Weights\.\w+")


def is_weights_name(value: str) -> bool:
    """Whether ``value`` reads like a torchvision weights name (``ResNet18_Weights.IMAGENET1K_V1``)."""
    return bool(_WEIGHTS_NAME.fullmatch(str(value))) and not Path(value).exists()


def absolute_weights(value: str | None) -> str | None:
    """A weights file's path made absolute (so another folder's command finds it); a torchvision
    weights name, or none, as it is."""
    return value if not value or is_weights_name(value) else str(Path(value).expanduser().absolute())


def weights_file(path: str | Path) -> Path:
    """The file a weights argument names: itself, ``model.safetensors`` (or the like) in a folder,
    or a torchvision weights name's file in the local torch hub cache."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            raise ModelError(f"folder {str(path)!r} holds none of {', '.join(WEIGHT_FILES)}: give the weights file")
        return found
    if is_weights_name(str(path)):
        return _cached_torchvision_weights(str(path))
    return path


def _cached_torchvision_weights(name: str) -> Path:
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise ModelError(f"torchvision has no weights {name!r}: see torchvision.models for the names") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise ModelError(f"{name} is not in the local torch hub cache ({cached}): labelless downloads nothing; "
                         f"fetch {weights.url} into that folder, or give a weights file")
    return cached


def _torchvision_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The normalisation torchvision's weights ``name`` were trained with (their transforms'; for
    weights that expect ``transform_input``, the normalisation that step amounts to)."""
    if name.startswith(TRANSFORM_INPUT_WEIGHTS):
        return TRANSFORM_INPUT_NORMALISATION
    try:
        transforms = torchvision.models.get_weight(name).transforms()
        return tuple(transforms.mean), tuple(transforms.std)
    except Exception:  # noqa: BLE001 - an unknown name or transforms without mean/std: as if none were stored
        return None


def state_digest(model: nn.Module) -> str:
    """sha256 over every entry of ``model``'s state_dict: its name and its exact bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


NORMALISATION_KEY = "labelless.normalisation"  # safetensors metadata: {"mean": [...], "std": [...]}


def save_checkpoint(model: nn.Module, path: str | Path, spec: ModelSpec) -> None:
    """Write ``model``'s state_dict as safetensors, atomically, with the normalisation of
    ``spec`` in the metadata so that later commands find it without ``--mean/--std``."""
    import safetensors.torch

    from .io import atomic_path

    metadata = {NORMALISATION_KEY: json.dumps({"mean": list(spec.mean), "std": list(spec.std)})}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata)


def stored_normalisation(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) :func:`save_checkpoint` stored in a safetensors file; None if there are none."""
    from safetensors import safe_open

    if is_weights_name(str(path)):
        return _torchvision_normalisation(str(path))
    try:
        path = weights_file(path)
    except ModelError:
        return None  # load_state_dict_file says what is wrong
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(NORMALISATION_KEY)
        data = json.loads(text) if text else None
        mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
    except Exception:  # noqa: BLE001 - unreadable or foreign metadata: as if there were none
        return None
    return (mean, std) if mean and std else None


def normalisation_for(weights: str | Path | None, mean: tuple[float, ...], std: tuple[float, ...],
                      given: str = "--mean/--std") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation a model of ``weights`` is fed: ``mean``/``std`` when given (``given``
    names where, for the messages), else the one stored in the checkpoint, so a teacher never
    sees images normalised otherwise than in its training; empty when neither says (ImageNet's)."""
    stored = stored_normalisation(weights) if weights else None
    if stored is None:
        if weights and not mean and not std:
            log.warning("%s stores no normalisation and no %s was given: images are normalised with ImageNet's "
                        "mean and std; give %s as in training (a checkpoint `labelless train` writes as "
                        ".safetensors stores them)", weights, given, given)
        return tuple(mean), tuple(std)
    if not mean or not std:  # the half not given is the checkpoint's, not ImageNet's
        log.info("normalisation stored in %s: mean %s, std %s", weights, list(stored[0]), list(stored[1]))
        mean, std = tuple(mean) or stored[0], tuple(std) or stored[1]
    if (tuple(mean), tuple(std)) != stored:
        log.warning("%s differ from the normalisation stored in %s (mean %s, std %s): using yours",
                    given, weights, list(stored[0]), list(stored[1]))
    return tuple(mean), tuple(std)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not code being refused: bytes that are no checkpoint
            raise ModelError(f"{path}: not a readable PyTorch checkpoint (corrupted, or not a checkpoint at all): "
                             "give a .pt/.pth state_dict or a .safetensors file") from None
        raise ModelError(
            f"{path}: refused to load: it holds pickled objects beyond plain tensors, and "
            "labelless never runs code from a checkpoint; re-save it as model.state_dict() "
            "or as .safetensors"
        ) from None
    except Exception as exc:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        if isinstance(state, dict):
            inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
            if inner is not None:
                state = inner
                continue
        break
    raise ModelError(
        f"{path}: not a state_dict (expected a mapping of parameter names to tensors, "
        f"got {type(state).__name__}); save model.state_dict()"
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


MODEL_FLAGS_ADVICE = "check --model, --num-classes, --in-channels and --small-input (a custom model: --model-args)"


def load_weights(model: nn.Module, path: str | Path, advice: str = MODEL_FLAGS_ADVICE) -> nn.Module:
    """Load a checkpoint into ``model`` in place, with a clear error on any mismatch (ending in ``advice``)."""
    state = adapt_state(model, load_state_dict_file(path))  # torchvision's legacy names and auxiliary heads
    check_state_dict(model, state, source=str(path), advice=advice)
    check_finite(state, source=str(path))
    model.load_state_dict(_with_metadata(state, model), strict=True)
    return model


def _with_metadata(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` carrying the model's per-module ``_metadata`` (versions), which safetensors and
    unwrapping drop; some modules (torchvision's MNASNet) refuse a state_dict without it."""
    if getattr(state, "_metadata", None) is not None:
        return state
    with_metadata = collections.OrderedDict(state)
    with_metadata._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return with_metadata


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`ModelError` naming the first floating-point tensor with a NaN or an infinity."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            n_bad = int((~torch.isfinite(value)).sum())
            raise ModelError(
                f"{source}: {key} holds {n_bad} NaN or infinite value(s): the checkpoint is broken "
                "(training diverged?); use an earlier checkpoint or retrain the model"
            )


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                     advice: str = MODEL_FLAGS_ADVICE) -> None:
    """Raise :class:`ModelError` unless ``state`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or wrong):
        return
    what = type(model).__name__
    spec = getattr(model, "labelless_spec", None)
    if spec is not None:
        what = f"{spec.name} (num_classes={spec.num_classes}, in_channels={spec.in_channels})"
    detail = "; ".join(
        f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
        if items
    )
    raise ModelError(f"{source} does not fit {what} ({detail}): {advice}")


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

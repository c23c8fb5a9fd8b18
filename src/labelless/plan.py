"""Plans: which layer gets how many centroids.

A plan is a list of rules applied in order; a later rule overrides an earlier one field by
field. Layers no rule mentions stay at full precision::

    - layers: "*"        # every quantizable layer
      bias: 1
    - layers: "14-15"    # 1-based positions in forward order; also "1,3,5-7",
      weights: 32        # a dotted module name, "re:<regex>" or "type:<class name>",
                         # or several of these joined by commas ("conv1,14-15")

``weights``/``bias`` take a whole number of centroids >= 1, or ``null`` for full precision.
Two more fields shape how a layer's *weights* are clustered::

    - layers: "*"
      weights: 4
      granularity: per_channel   # per_tensor (default): one codebook for the tensor;
      group_size: 1              # per_channel: one codebook per group_size output channels
      importance: true           # weight the k-means by label-free importance when quantize
                                 # was given some (default); false: plain squared error
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import PlanError
from .io import check_input_file
from .layers import QUANTIZABLE_TYPES, LayerInfo

__all__ = ["Plan", "Rule", "LayerSetting", "TensorChoice", "GRANULARITIES", "load_plan"]

_FIELDS = ("layers", "weights", "bias", "granularity", "group_size", "importance")
_OPTIONS = ("granularity", "group_size", "importance")
GRANULARITIES = ("per_tensor", "per_channel")
_UNSET = "unset"
_MAX_CLUSTERS = 1 << 24


@dataclass(frozen=True)
class LayerSetting:
    """Centroids for one layer's weights and bias; ``None`` keeps it at full precision.

    ``granularity``/``group_size`` say how many codebooks the weights get (one, or one per
    ``group_size`` output channels); ``importance`` whether label-free importance weights
    the clustering when some is given.
    """

    weights: int | None = None
    bias: int | None = None
    granularity: str = "per_tensor"
    group_size: int = 1
    importance: bool = True

    @property
    def quantized(self) -> bool:
        return self.weights is not None or self.bias is not None


@dataclass(frozen=True)
class TensorChoice:
    """How one tensor is quantized: ``k`` centroids, in one codebook or one per
    ``group_size`` output channels. What the sweep tries and the search picks, per tensor."""

    k: int
    granularity: str = "per_tensor"
    group_size: int = 1

    @classmethod
    def of(cls, value: "int | TensorChoice") -> "TensorChoice":
        return value if isinstance(value, TensorChoice) else cls(int(value))

    @property
    def label(self) -> str:
        """``"16"``, or ``"16/ch"`` per channel (``"16/ch4"`` per group of 4 channels)."""
        if self.granularity == "per_tensor":
            return str(self.k)
        return f"{self.k}/ch" + (str(self.group_size) if self.group_size > 1 else "")


@dataclass(frozen=True)
class Rule:
    """One plan rule. A field left as ``"unset"`` does not override earlier rules."""

    layers: str
    weights: int | None | str = _UNSET
    bias: int | None | str = _UNSET
    granularity: str = _UNSET
    group_size: int | str = _UNSET
    importance: bool | str = _UNSET

    def __post_init__(self) -> None:
        if not isinstance(self.layers, str) or not self.layers.strip():
            raise PlanError(f"a rule's 'layers' must be a non-empty selector, got {self.layers!r}")
        for field in ("weights", "bias"):
            value = getattr(self, field)
            if value != _UNSET:
                object.__setattr__(self, field, _clusters(value, field))
        _check_options(self)
        if all(getattr(self, f) == _UNSET for f in _FIELDS[1:]):
            raise PlanError(f"rule for layers {self.layers!r} sets neither 'weights' nor 'bias'")

    def set_fields(self) -> dict[str, Any]:
        """The fields this rule sets (all but ``layers``)."""
        return {f: getattr(self, f) for f in _FIELDS[1:] if getattr(self, f) != _UNSET}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, **self.set_fields()}


def _check_options(rule: "Rule") -> None:
    if rule.granularity != _UNSET and rule.granularity not in GRANULARITIES:
        raise PlanError(f"'granularity' must be one of {list(GRANULARITIES)}, got {rule.granularity!r}")
    size = rule.group_size
    if size != _UNSET and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise PlanError(f"'group_size' must be a whole number of output channels >= 1, got {size!r}")
    if rule.importance != _UNSET and not isinstance(rule.importance, bool):
        raise PlanError(f"'importance' must be true or false, got {rule.importance!r}")


def _clusters(value: Any, field: str) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "fp32")):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"'{field}' must be a whole number of centroids >= 1 or null, got {value!r}")
    if not 1 <= value <= _MAX_CLUSTERS:
        raise PlanError(f"'{field}' must be between 1 and {_MAX_CLUSTERS} centroids, got {value}")
    return value


@dataclass(frozen=True)
class Plan:
    """An ordered list of rules.

    Example:
        >>> plan = Plan.from_data([{"layers": "*", "bias": 1}, {"layers": "14-15", "weights": 32}])
        >>> plan.resolve(list_layers(model))["classifier.0"]
        LayerSetting(weights=32, bias=1)
    """

    rules: tuple[Rule, ...]

    @classmethod
    def from_data(cls, data: Any) -> "Plan":
        if isinstance(data, dict) and "rules" in data:
            data = data["rules"]
        if not isinstance(data, list) or not data:
            raise PlanError("a plan must be a non-empty list of rules like {layers: '*', weights: 16}")
        return cls(tuple(_rule(item, position) for position, item in enumerate(data, 1)))

    @classmethod
    def from_choice(cls, choice: dict[str, Any]) -> "Plan":
        """One rule per layer from ``{"<module name>.weight|bias": k}``, naming layers by name.

        A value may also be a :class:`TensorChoice` (k plus how the weights are clustered).
        """
        rules: dict[str, dict[str, Any]] = {}
        for key, value in choice.items():
            layer, _, tensor = key.rpartition(".")
            option = TensorChoice.of(value)
            rule = rules.setdefault(layer, {"layers": layer})
            rule["weights" if tensor == "weight" else "bias"] = option.k
            if tensor == "weight" and option.granularity != "per_tensor":
                rule.update(granularity=option.granularity, group_size=option.group_size)
        return cls.from_data(list(rules.values()))

    @classmethod
    def uniform(cls, weights: int | None, bias: int | None = None) -> "Plan":
        return cls((Rule("*", weights=weights, bias=bias),))

    def to_data(self) -> list[dict[str, Any]]:
        return [rule.to_dict() for rule in self.rules]

    def save(self, path: str | Path, header: str = "") -> None:
        from .io import atomic_write_text

        text = yaml.safe_dump(self.to_data(), sort_keys=False)
        if str(path).endswith(".json"):
            text = json.dumps(self.to_data(), indent=2) + "\n"
        elif header:
            text = "".join(f"# {line}\n" for line in header.splitlines()) + text
        atomic_write_text(path, text)

    def resolve(
        self, layers: list[LayerInfo], other_modules: dict[str, str] | None = None
    ) -> dict[str, LayerSetting]:
        """The setting of every layer some rule touches, keyed by dotted module name.

        ``other_modules`` (name -> class name of the model's other modules) lets an error
        say why a selector naming, say, a BatchNorm layer selects nothing.
        """
        settings: dict[str, dict[str, Any]] = {}
        for rule in self.rules:
            for layer in select(rule.layers, layers, other_modules):
                current = settings.setdefault(layer.name, {"weights": None, "bias": None})
                current.update(rule.set_fields())
        by_name = {layer.name: layer for layer in layers}
        resolved = {}
        for name, fields in settings.items():
            if not by_name[name].n_bias:
                fields["bias"] = None
            setting = LayerSetting(**fields)
            if setting.quantized:
                resolved[name] = setting
        return resolved


def _rule(item: Any, position: int) -> Rule:
    if not isinstance(item, dict):
        raise PlanError(f"rule {position} must be a mapping like {{layers: '*', weights: 16}}, got {item!r}")
    unknown = sorted(set(item) - set(_FIELDS))
    if unknown:
        raise PlanError(f"rule {position} has unknown field(s) {unknown}; valid fields: {list(_FIELDS)}")
    if "layers" not in item:
        raise PlanError(f"rule {position} has no 'layers' selector")
    layers = item["layers"]
    if isinstance(layers, (int, list)) and not isinstance(layers, bool):
        layers = ",".join(str(x) for x in (layers if isinstance(layers, list) else [layers]))
    try:
        return Rule(layers=layers, **{f: item.get(f, _UNSET) for f in _FIELDS[1:]})
    except PlanError as exc:
        raise PlanError(f"rule {position}: {exc}") from None


def load_plan(source: str | Path | list | dict | Plan) -> Plan:
    """A plan from a YAML/JSON file, parsed data, or a Plan."""
    if isinstance(source, Plan):
        return source
    if isinstance(source, (list, dict)):
        return Plan.from_data(source)
    path = check_input_file(source, "plan file", PlanError)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PlanError(f"{path}: not valid YAML/JSON{where}: fix the syntax") from None
    try:
        return Plan.from_data(data)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None


# -- selectors -----------------------------------------------------------------------------

_INDEX_LIST = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")


def select(
    selector: str, layers: list[LayerInfo], other_modules: dict[str, str] | None = None
) -> list[LayerInfo]:
    """Layers a selector names; a selector that names none is an error listing what is valid."""
    selector = selector.strip()
    if "," in selector and not selector.startswith("re:") and not _INDEX_LIST.match(selector):
        parts = [select(part, layers, other_modules) for part in selector.split(",") if part.strip()]
        chosen_names = {layer.name for part in parts for layer in part}
        return [layer for layer in layers if layer.name in chosen_names]
    if selector in ("*", "all"):
        chosen = list(layers)
    elif _INDEX_LIST.match(selector):
        chosen = _by_index(selector, layers)
    elif selector.startswith("re:"):
        chosen = _by_regex(selector[3:], layers)
    elif selector.startswith("type:"):
        chosen = [layer for layer in layers if layer.type == selector[5:].strip()]
    else:
        chosen = [layer for layer in layers if layer.name == selector]
    if not chosen and selector in (other_modules or {}):
        raise PlanError(
            f"{selector!r} is a {other_modules[selector]}, which labelless cannot quantize; "
            f"quantizable types: {', '.join(t.__name__ for t in QUANTIZABLE_TYPES)}"
        )
    if not chosen:
        raise PlanError(f"selector {selector!r} matches no layer; {_valid(layers)}")
    return chosen


def _by_index(selector: str, layers: list[LayerInfo]) -> list[LayerInfo]:
    wanted: list[int] = []
    for part in selector.split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if first > last:
            raise PlanError(f"layer range {part.strip()!r} runs backwards: write it low-high")
        for index in (first, last):
            if not 1 <= index <= len(layers):
                raise PlanError(
                    f"layer {index} is out of range: the model has {len(layers)} quantizable "
                    f"layers, numbered 1-{len(layers)} (see `labelless layers`)"
                )
        wanted.extend(range(first, last + 1))
    keep = set(wanted)
    return [layer for layer in layers if layer.index in keep]


def _by_regex(pattern: str, layers: list[LayerInfo]) -> list[LayerInfo]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise PlanError(f"bad regular expression {pattern!r}: {exc}") from None
    return [layer for layer in layers if compiled.fullmatch(layer.name)]


def _valid(layers: Iterable[LayerInfo]) -> str:
    layers = list(layers)
    if not layers:
        return "the model has no quantizable (Conv/Linear) layer"
    names = ", ".join(layer.name for layer in layers[:4])
    types = ", ".join(sorted({layer.type for layer in layers}))
    return (
        f"valid: '*', indices 1-{len(layers)}, names such as {names}{' ...' if len(layers) > 4 else ''}, "
        f"'re:<regex>' (full match) or 'type:<{types}>'"
    )

"""Frozen config dataclasses to and from plain mappings (YAML/JSON), with clear errors."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import LabellessError
from .io import check_input_file

__all__ = ["Choice", "is_choice", "coerce_choices", "from_mapping", "to_mapping", "load_yaml", "option", "commented_yaml"]

T = TypeVar("T")


class Choice(str, enum.Enum):
    """A field's closed set of values (subclass it): YAML, JSON, the CLI and comparisons see
    its plain string (``BatchNorm.FROZEN == "frozen"``), and a wrong value is one clear line."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # in messages (argparse's "choose from", a list of valid values): the string
        return repr(self.value)

    @classmethod
    def parse(cls, value: Any, where: str) -> "Choice":
        try:
            return cls(value)
        except ValueError:
            names = [member.value for member in cls]
            raise LabellessError(f"{where} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}") from None


def is_choice(hint: Any) -> bool:
    """Whether a field's type hint is a :class:`Choice`."""
    return isinstance(hint, type) and issubclass(hint, Choice)


def coerce_choices(config: Any) -> None:
    """For a frozen dataclass's ``__post_init__``: every :class:`Choice` field given as a plain
    string (from Python) becomes its member, or fails with one line naming the valid values."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        hint = hints[f.name]
        if is_choice(hint):
            object.__setattr__(config, f.name, hint.parse(getattr(config, f.name), f.name))


def option(default: Any, help: str) -> Any:
    """A config field with its help text: the comment of :func:`commented_yaml` and the help of
    a CLI flag derived from the field (a :class:`Choice` field's flag takes its values)."""
    return dataclasses.field(default=default, metadata={"help": help})


def commented_yaml(config: Any) -> str:
    """``config`` as YAML, each field with its help as a comment: a starting point for a config
    file (``labelless run --print-config``); :func:`from_mapping` reads it back unchanged."""
    return "\n".join(_yaml_lines(config, 0)) + "\n"


def _yaml_lines(config: Any, depth: int) -> list[str]:
    pad, lines = "  " * depth, []
    for f in dataclasses.fields(config):
        value, note = getattr(config, f.name), f.metadata.get("help")
        comment = f"  # {note}" if note else ""
        if dataclasses.is_dataclass(value):
            lines += [f"{pad}{f.name}:{comment}", *_yaml_lines(value, depth + 1)]
        else:
            text = yaml.safe_dump(to_plain(value), default_flow_style=True, width=10_000).strip()
            lines.append(f"{pad}{f.name}: {text.removesuffix('...').strip()}{comment}")
    return lines


def from_mapping(cls: type[T], data: Any, where: str = "config", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors.

    A field left out keeps its value in ``base`` (by default the class's own default). A
    section given in part is merged the same way onto the section its field defaults to, so
    ``retrain: {lr: 0.001}`` changes the learning rate of the run's retraining and nothing else
    (not back to :class:`RetrainConfig`'s own defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LabellessError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise LabellessError(f"{where}: unknown field(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, f"{where}.{name}", _default(fields[name], base))
              for name, value in data.items()}
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (TypeError, ValueError) as exc:  # LabellessError is a ValueError: say where it came from
        raise LabellessError(f"{where}: {exc}") from None


def _default(f: dataclasses.Field, base: Any) -> Any:
    """What field ``f`` holds when the mapping leaves it out: its value in ``base``, else its default."""
    if base is not None:
        return getattr(base, f.name)
    return f.default if f.default is not dataclasses.MISSING else None


def _convert(hint: Any, value: Any, where: str, default: Any = None) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where, default if isinstance(default, hint) else None)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        return _convert(next(o for o in options if o is not type(None)), value, where, default)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise LabellessError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_convert(item, v, where) for v in value)
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if is_choice(hint):
        return hint.parse(value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise LabellessError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            raise LabellessError(f"{where} must be a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise LabellessError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise LabellessError(f"{where} must be a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise LabellessError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def to_mapping(config: Any) -> dict[str, Any]:
    """A dataclass as plain JSON/YAML data (tuples become lists)."""
    return to_plain(dataclasses.asdict(config))


def to_plain(value: Any) -> Any:
    """``value`` with tuples as lists and paths as strings, for JSON and YAML."""
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Choice):
        return value.value
    return value


def load_yaml(path: str | Path) -> Any:
    path = check_input_file(path, "config file")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LabellessError(f"{path}: not valid YAML{where}: fix the syntax") from None

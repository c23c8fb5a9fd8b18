#!/usr/bin/env python
"""Fuzz the .lless reader: a mutated file is rejected with FileFormatError, or it loads a
model whose outputs are bit-identical to the one saved.

    python bench/fuzz_lless.py --cases 10000 --seed 0

Seeds are small quantized models saved with every storage option (packed and ANS indices,
fp16 codebooks and dense tensors, shared tensors, k = 1/2/16/300, a custom module and
torchvision ones). Each case mutates one seed, deterministically from (seed, case), in one
of four families:

  bytes    truncations, bit flips in the length prefix, header or data, overwritten,
           inserted or deleted ranges, lying header lengths
  outer    the safetensors JSON, re-serialised: dtypes, shapes, offsets that overlap or run
           past the end, missing, renamed or duplicate entries, metadata
  header   the labelless JSON, re-serialised: any field replaced by a value of another type
           or range, targeted lies (shapes, k, bits, codings, dtypes, versions,
           architectures, aliases, duplicate keys). The tensors are untouched, so a file
           that still loads must give the saved model.
  tensors  the tensors themselves (NaN centroids, indices >= k, garbage ANS data, counts
           that do not sum, quantized buffers, ...) with the header adjusted and the checksum
           recomputed, so the checks behind the checksum are reached. Such a file may hold a
           *different* model; it must then load a well-formed one.

Every case runs in a worker process under a time limit. The outcomes are counted, every
failure is saved to bench/results/fuzz_failures/ with the bytes that reproduce it, and the
summary goes to bench/results/fuzz_lless.json. A case fails when the reader raises anything
but FileFormatError (or LabellessError asking for the model of a custom file), prints a
message of more than one line, runs past the time limit, loads a model that differs when
it must not, loads a malformed model, or triggers a code-execution audit event (pickle,
os.system, subprocess, exec).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors.torch
import torch
from torch import nn

import labelless
from labelless import coding, fileformat, layout
from labelless.errors import FileFormatError, LabellessError

RESULTS = Path(__file__).resolve().parent / "results"
MAX_MESSAGE = 600  # characters in one error line


# -- seed models ---------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Conv, depthwise conv, BatchNorm, two Linear layers: a custom module (no architecture)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(128, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W) -> (N, 10)
        x = torch.relu(self.bn(self.depthwise(torch.relu(self.conv(x)))))
        return self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))))


class TiedNet(nn.Module):
    """A module used under two names and a BatchNorm shared twice: the file holds aliases."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.again = self.block
        self.bn = nn.BatchNorm2d(8)
        self.bn_again = self.bn
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W) -> (N, 10)
        x = torch.relu(self.bn(self.block(torch.relu(self.stem(x)))))
        x = torch.relu(self.bn_again(self.again(x)))
        return self.head(x.mean((2, 3)))


@dataclasses.dataclass(frozen=True)
class SeedRecipe:
    name: str
    build: Callable[[], nn.Module]
    plan: list
    save: dict
    weight: int  # how often cases pick this seed
    custom: bool  # no architecture in the file: load needs model=build()


def _spec(name: str) -> Callable[[], nn.Module]:
    return lambda: labelless.build_model(labelless.ModelSpec(name, num_classes=10, in_channels=1, small_input=True))


FP16 = {"codebook_dtype": "float16", "dense_dtype": "float16"}
K16 = [{"layers": "*", "weights": 16, "bias": 1}]
RECIPES = [  # name, model, plan, save options, weight, custom
    SeedRecipe("tiny-k16-packed", TinyNet, K16, {}, 3, True),
    SeedRecipe("tiny-k300-ans-fp16", TinyNet, [{"layers": "*", "weights": 300, "bias": 4}],
               {"entropy": "ans", **FP16}, 3, True),
    SeedRecipe("tied-k4-ans", TiedNet, [{"layers": "*", "weights": 4, "bias": 1}], {"entropy": "ans"}, 2, True),
    SeedRecipe("tied-k2-packed-fp16", TiedNet, [{"layers": "*", "weights": 2, "bias": 2}],
               {"dense_dtype": "float16"}, 1, True),
    SeedRecipe("shufflenet-k16-packed", _spec("shufflenet_v2_x0_5"), K16, {}, 2, False),
    SeedRecipe("shufflenet-k8-ans", _spec("shufflenet_v2_x0_5"), [{"layers": "*", "weights": 8, "bias": 2}],
               {"entropy": "ans"}, 1, False),
    SeedRecipe("resnet18-k16-packed", _spec("resnet18"), K16, {}, 1, False),
    SeedRecipe("resnet18-k16-ans-fp16", _spec("resnet18"), K16, {"entropy": "ans", **FP16}, 1, False),
]
SMALL_RECIPES = [r for r in RECIPES if not r.name.startswith("resnet18")]


def _randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Every tensor non-trivial (BatchNorm starts at 1s and 0s), so a lie about it shows."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=generator) * 0.2 + ("running_var" in key))
                if "running_var" in key:
                    value.abs_()
            else:
                value.fill_(int(torch.randint(1, 1000, (), generator=generator)))


def make_seed(recipe: SeedRecipe, path: Path) -> None:
    torch.manual_seed(0)
    model = recipe.build().eval()
    _randomise(model, torch.Generator().manual_seed(1))
    quantized = labelless.quantize(model, recipe.plan)
    labelless.save(quantized, path, **recipe.save)


@dataclasses.dataclass
class Seed:
    """A saved seed and its parts, parsed once."""

    recipe: SeedRecipe
    path: Path
    data: bytes
    header_len: int
    outer: dict  # the safetensors JSON header
    header: dict  # the labelless JSON header
    tensors: dict[str, torch.Tensor]

    @classmethod
    def open(cls, recipe: SeedRecipe, path: Path) -> "Seed":
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        outer = json.loads(data[8 : 8 + header_len])
        header = json.loads(outer["__metadata__"]["labelless"])
        return cls(recipe, path, data, header_len, outer, header, safetensors.torch.load(data))

    @property
    def body(self) -> bytes:
        return self.data[8 + self.header_len :]


def prepare_seeds(folder: Path, recipes: list[SeedRecipe]) -> list[Seed]:
    folder.mkdir(parents=True, exist_ok=True)
    seeds = []
    for recipe in recipes:
        path = folder / f"{recipe.name}.lless"
        if not _readable(path):  # missing, or written by an older version of the format
            make_seed(recipe, path)
        seeds.append(Seed.open(recipe, path))
    return seeds


def _readable(path: Path) -> bool:
    try:
        fileformat.read(path)
    except (OSError, FileFormatError):
        return False
    return True


# -- mutations -----------------------------------------------------------------------------


@dataclasses.dataclass
class Mutation:
    data: bytes
    family: str
    what: str  # a one-line description: which operator, where
    allow_different: bool = False  # tensors changed and checksum recomputed


def mutate(rng: random.Random, seed: Seed) -> Mutation:
    family = rng.choices(["bytes", "outer", "header", "tensors"], weights=[30, 15, 35, 20])[0]
    return {"bytes": _bytes_mutation, "outer": _outer_mutation,
            "header": _header_mutation, "tensors": _tensor_mutation}[family](rng, seed)


def case_rng(seed: int, case: int) -> random.Random:
    return random.Random(f"lless-fuzz:{seed}:{case}")


def choose_seed(rng: random.Random, seeds: list[Seed]) -> Seed:
    return rng.choices(seeds, weights=[s.recipe.weight for s in seeds])[0]


def _assemble(outer: Any, body: bytes, text: str | None = None) -> bytes:
    raw = (text if text is not None else json.dumps(outer, separators=(",", ":"))).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


# bytes --------------------------------------------------------------------------------------


def _bytes_mutation(rng: random.Random, seed: Seed) -> Mutation:
    data = bytearray(seed.data)
    op = rng.choice(["truncate", "truncate_near", "flip", "flip", "overwrite", "insert", "delete",
                     "length", "append", "duplicate"])
    start = 8 + seed.header_len
    region = rng.choice([(0, 8), (8, start), (start, len(data)), (0, len(data))])
    if op == "truncate":
        cut = rng.randrange(len(data))
        return Mutation(bytes(data[:cut]), "bytes", f"truncate to {cut} of {len(data)} bytes")
    if op == "truncate_near":
        cut = max(0, rng.choice([8, start, len(data)]) + rng.randint(-16, -1))
        return Mutation(bytes(data[:cut]), "bytes", f"truncate to {cut} of {len(data)} bytes")
    if op == "flip":
        spots = [rng.randrange(*region) for _ in range(rng.choice([1, 1, 2, 8]))]
        for spot in spots:
            data[spot] ^= 1 << rng.randrange(8)
        return Mutation(bytes(data), "bytes", f"flip bits at {spots}")
    if op == "overwrite":
        at, n = rng.randrange(*region), rng.choice([1, 4, 8, 64, 4096])
        fill = rng.choice([b"\x00", b"\xff", None])
        data[at : at + n] = fill * n if fill else rng.randbytes(n)
        return Mutation(bytes(data[: len(seed.data)]), "bytes", f"overwrite {n} bytes at {at} with {fill!r}")
    if op == "insert":
        at, n = rng.randrange(*region), rng.choice([1, 3, 8, 100])
        data[at:at] = rng.randbytes(n)
        return Mutation(bytes(data), "bytes", f"insert {n} bytes at {at}")
    if op == "delete":
        at, n = rng.randrange(*region), rng.choice([1, 3, 8, 100])
        del data[at : at + n]
        return Mutation(bytes(data), "bytes", f"delete {n} bytes at {at}")
    if op == "length":
        value = rng.choice([0, 1, 2, 7, seed.header_len - 1, seed.header_len + 1, seed.header_len + 8,
                            len(data), 64 << 20, (64 << 20) + 1, 2**32, 2**63, 2**64 - 1, rng.getrandbits(64)])
        data[:8] = (value % 2**64).to_bytes(8, "little")
        return Mutation(bytes(data), "bytes", f"declare a {value}-byte header")
    if op == "append":
        n = rng.choice([1, 8, 1000])
        return Mutation(bytes(data) + rng.randbytes(n), "bytes", f"append {n} bytes")
    return Mutation(bytes(data) * 2, "bytes", "the file twice")


# outer (safetensors) JSON ---------------------------------------------------------------------

_ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U64", "F8_E4M3", "X", ""]


def _outer_mutation(rng: random.Random, seed: Seed) -> Mutation:
    outer = copy.deepcopy(seed.outer)
    names = sorted(k for k in outer if k != "__metadata__")
    name = rng.choice(names)
    op = rng.choice(["dtype", "shape", "offsets", "offsets", "delete", "rename", "alias_offsets",
                     "swap", "metadata", "duplicate_key", "padding"])
    entry = outer[name]
    if op == "dtype":
        entry["dtype"] = rng.choice(_ST_DTYPES + [1, None])
    elif op == "shape":
        entry["shape"] = _lying_shape(rng, entry["shape"])
    elif op == "offsets":
        entry["data_offsets"] = _lying_offsets(rng, entry["data_offsets"], len(seed.body))
    elif op == "delete":
        del outer[name]
    elif op == "rename":
        outer[rng.choice([name + "x", name.split("::")[0], name + "::codebook", "", "__metadata__x"])] = outer.pop(name)
    elif op == "alias_offsets":  # a second entry over the same bytes
        outer[name + "_copy"] = dict(entry)
    elif op == "swap":
        other = outer[rng.choice(names)]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif op == "metadata":
        _lying_metadata(rng, outer)
    elif op == "duplicate_key":
        text = json.dumps(outer, separators=(",", ":"))
        twin = json.dumps({name: {**entry, "data_offsets": _lying_offsets(rng, entry["data_offsets"], len(seed.body))}})
        text = "{" + twin[1:-1] + "," + text[1:]
        return Mutation(_assemble(None, seed.body, text), "outer", f"duplicate key {name!r}")
    else:
        text = json.dumps(outer, separators=(",", ":")) + rng.choice(["\x00" * 3, "\t\n", "x", "}"])
        return Mutation(_assemble(None, seed.body, text), "outer", "odd padding after the header")
    return Mutation(_assemble(outer, seed.body), "outer", f"{op} of {name!r}")


def _lying_shape(rng: random.Random, shape: list) -> Any:
    numel = math.prod(shape)
    return rng.choice([
        [numel], list(reversed(shape)), shape + [1], [1] + shape, shape[:-1], [], [numel + 1],
        [2**39], [2**63], [2**64 + 1], [-1] + shape, [numel / 2, 2], [0], "x", None, [[numel]],
    ])


def _lying_offsets(rng: random.Random, offsets: list, body: int) -> Any:
    a, b = offsets
    return rng.choice([
        [a, b + 1], [a - 1, b], [a + 1, b + 1], [b, a], [a, body + 1], [a, body * 100], [0, b],
        [a, 2**64 - 1], [a, 2**64], [-1, b], [a, b, b], [a], [float(a), b], [str(a), b], None,
    ])


def _lying_metadata(rng: random.Random, outer: dict) -> None:
    choice = rng.randrange(5)
    if choice == 0:
        del outer["__metadata__"]
    elif choice == 1:
        outer["__metadata__"]["labelless"] = rng.choice([1, None, ["x"], {"a": "b"}])
    elif choice == 2:
        outer["__metadata__"] = rng.choice([[], "x", None, {}])
    elif choice == 3:
        outer["__metadata__"]["extra"] = "x" * rng.choice([1, 100_000])
    else:
        outer["__metadata__"]["labelless"] += rng.choice([" ", "x", "}", "\x00"])


# labelless JSON header --------------------------------------------------------------------

_HUGE = [2**24, 2**24 + 1, 2**31, 2**32, 2**39, 2**53 + 1, 2**62, 2**63, 2**64, 10**30, 10**4000]
_NASTY = [None, True, False, 0, -1, 1, 2, 3, 255, 256, 257, *_HUGE, 0.5, -0.0, 1.0, 1e308,
          float("nan"), float("inf"), "", "x", "1", "float32", "float16", "int8", "int64", "bool",
          "ans", "packed", "quantized", "dense", "labelless", "sha256", "conv.weight", "::", "a::b",
          "\x00", "é", [], {}, [0], [1, 2, 3], [[[]]], {"a": 1}]


def _nasty(rng: random.Random) -> Any:
    pick = rng.randrange(len(_NASTY) + 3)
    if pick == len(_NASTY):
        return [0] * rng.choice([9, 100_000])
    if pick == len(_NASTY) + 1:
        return "x" * rng.choice([81, 1_000_000])
    if pick == len(_NASTY) + 2:
        return rng.choice([_DEEP, _BIG_INT])
    return copy.deepcopy(_NASTY[pick])


# Values json.dumps cannot write: placeholders, replaced in the JSON text.
_DEEP, _BIG_INT = "\x01deep", "\x01bigint"
_PLACEHOLDERS = {json.dumps(_DEEP): "[" * 5000 + "]" * 5000, json.dumps(_BIG_INT): "9" * 5000}


def _dumps(header: Any) -> str:
    text = json.dumps(header)
    for placeholder, value in _PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return text


def _header_mutation(rng: random.Random, seed: Seed) -> Mutation:
    header = copy.deepcopy(seed.header)
    if rng.random() < 0.45:
        what = _tree_mutation(rng, header)
    else:
        lie = rng.choice(sorted(_LIES))
        what = _LIES[lie](rng, header)
        if isinstance(what, tuple):  # a lie that needs the exact JSON text (duplicate keys)
            text, what = what
            return Mutation(_with_labelless_text(seed, text), "header", f"{lie}: {what}")
        what = f"{lie}: {what}"
    if rng.random() < 0.5 and isinstance(header, dict) and isinstance(header.get("checksum"), dict):
        header["checksum"]["header"] = layout.header_digest(header)  # reach the checks behind it
        what += " (header re-signed)"
    return Mutation(_with_labelless_text(seed, _dumps(header)), "header", what)


def _with_labelless_text(seed: Seed, text: str) -> bytes:
    outer = dict(seed.outer)
    outer["__metadata__"] = {**outer["__metadata__"], "labelless": text}
    return _assemble(outer, seed.body)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found.extend(_paths(child, prefix + (key,)))
    return found


def _tree_mutation(rng: random.Random, header: dict) -> str:
    path = rng.choice(_paths(header)[1:])
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    op = rng.choice(["replace", "replace", "tweak", "delete", "rename", "add"])
    if op == "delete":
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        parent[rng.choice(["", "x", key + "x", key.upper(), *list(parent)])] = parent.pop(key)
    elif op == "add" and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), _nasty(rng))
    elif op == "add":
        parent[rng.choice(["extra", "shape", "kind", "version", "name"])] = _nasty(rng)
    elif op == "tweak":
        parent[key] = _tweak(rng, value)
    else:
        parent[key] = _nasty(rng)
    return f"tree {op} at {list(path)!r}"[:300]


def _tweak(rng: random.Random, value: Any) -> Any:
    """A value of the same type, slightly or wildly off."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, value * 2, value // 2, value + 2**32, value * 10**20])
    if isinstance(value, float):
        return rng.choice([value * 2, -value, value + 1e-7, float("nan")])
    if isinstance(value, str):
        return rng.choice([value + "x", value[:-1], value.upper(), value * 2, value.replace(".", "..")])
    if isinstance(value, list):
        return rng.choice([value[::-1], value[:-1], value + value[-1:], value * 2, []])
    if isinstance(value, dict):
        return {**value, "extra": _nasty(rng)}
    return _nasty(rng)


def _entries(header: dict, kind: str | None = None, **where: Any) -> list[str]:
    return sorted(k for k, e in header["tensors"].items()
                  if (kind is None or e["kind"] == kind) and all(e.get(f) == v for f, v in where.items()))


def _lie_shape(rng: random.Random, header: dict) -> str:
    key = rng.choice(_entries(header))
    entry = header["tensors"][key]
    entry["shape"] = _lying_shape(rng, entry["shape"])
    return f"{key} shape {entry['shape']!r}"[:200]


def _lie_n_clusters(rng: random.Random, header: dict) -> str:
    key = rng.choice(_entries(header, "quantized"))
    entry = header["tensors"][key]
    k = rng.choice([entry["n_clusters"] - 1, entry["n_clusters"] + 1, 1, 0, 2**24, 2**24 + 1, 2**40, -3, 1.0])
    entry["n_clusters"] = k
    if rng.random() < 0.7 and isinstance(k, int) and k > 0:
        entry["bits"] = coding.index_bits(k)
    return f"{key} n_clusters {k}"


def _lie_bits(rng: random.Random, header: dict) -> str:
    key = rng.choice(_entries(header, "quantized"))
    entry = header["tensors"][key]
    entry["bits"] = rng.choice([entry["bits"] + 1, entry["bits"] - 1, 0, 64, 2**40, float(entry["bits"]),
                                entry["bits"] == 1, str(entry["bits"]), None])
    return f"{key} bits {entry['bits']!r}"


def _lie_coding(rng: random.Random, header: dict) -> str:
    key = rng.choice(_entries(header, "quantized"))
    entry = header["tensors"][key]
    entry["coding"] = rng.choice(["ans", "packed", "ANS", "huffman", None, 1])
    entry["codebook_dtype"] = rng.choice(["float16", "float32", "float64", "int8", ["float32"], None])
    return f"{key} coding {entry['coding']!r} codebook {entry['codebook_dtype']!r}"


def _lie_kind(rng: random.Random, header: dict) -> str:
    key = rng.choice(_entries(header))
    entry = header["tensors"][key]
    if entry["kind"] == "dense":
        entry.update(kind="quantized", n_clusters=1, bits=0, coding="packed", codebook_dtype="float32")
    else:
        entry.update(kind="dense", dtype="float32", stored_dtype="float32")
    return f"{key} kind {entry['kind']}"


def _lie_dtype(rng: random.Random, header: dict) -> str:
    key = rng.choice(_entries(header, "dense"))
    entry = header["tensors"][key]
    field = rng.choice(["dtype", "stored_dtype", "both"])
    value = rng.choice(list(layout.DTYPES) + ["float8", "", ["float32"], {"a": 1}, None])
    if field in ("dtype", "both"):
        entry["dtype"] = value
    if field in ("stored_dtype", "both"):
        entry["stored_dtype"] = value
    return f"{key} {field} {value!r}"


def _lie_version(rng: random.Random, header: dict) -> str:
    header["version"] = rng.choice([0, 3, 99, -1, "1", 1.0, True, None, 10**30, [1]])
    return f"version {header['version']!r}"


def _lie_architecture(rng: random.Random, header: dict) -> str:
    arch = header["architecture"]
    if arch is None or rng.random() < 0.15:
        header["architecture"] = rng.choice([
            None, [], "resnet18", {"name": "resnet18"}, {"name": "resnet18", "num_classes": 10, "in_channels": 1,
                                                         "small_input": True}, {},
        ])
        return f"architecture {header['architecture']!r}"
    field = rng.choice(["name", "num_classes", "in_channels", "small_input", "image_size", "mean", "std", "extra"])
    arch[field] = rng.choice(_ARCH_VALUES[field])
    return f"architecture {field} {arch[field]!r}"[:200]


_ARCH_VALUES = {
    "name": ["resnet34", "resnet50", "vit_h_14", "regnet_y_128gf", "shufflenet_v2_x1_0", "mobilenet_v3_small",
             "shufflenet_v2_x0_5", "resnet18", "os.system", "__import__('os')", "", None, 1],
    "num_classes": [11, 9, 1000, 100_000, 100_001, 10**9, 0, -5, 1.5, True, "10", None],
    "in_channels": [3, 2, 64, 65, 0, -1, 1.0, "1"],
    "small_input": [True, False, "yes", "no", 0, 1, None, []],
    "image_size": [0, 28, 33, 4096, 4097, -1, 1.5, "32"],
    "mean": [[0.5], [0.5, 0.5], [], ["abc"], [10**400], [float("nan")], "x", [[1]], None],
    "std": [[0.5], [0.0], [-1.0], [1e-300], [float("inf")], ["nan"], 1, None],
    "extra": [1, "x", None],
}


def _lie_aliases(rng: random.Random, header: dict) -> str:
    keys = _entries(header)
    aliases = header["aliases"]
    op = rng.randrange(6)
    if op == 0:
        key = rng.choice(keys)
        aliases[key] = key  # a loop onto itself
    elif op == 1:
        a, b = rng.sample(keys, 2)
        aliases["x.weight"], aliases["y.weight"] = "y.weight", "x.weight"  # a loop through aliases
        aliases[a] = b
    elif op == 2:
        aliases[rng.choice(["fc.weight", "conv.weight", "head.weight", ""])] = rng.choice(keys + ["missing"])
    elif op == 3:
        key = rng.choice(keys)
        entry = header["tensors"].pop(key)  # the entry goes, the data stays
        aliases[key] = rng.choice([k for k in keys if k != key] or [key])
        return f"alias {key} -> {aliases[key]} (was {entry['kind']})"
    elif op == 4 and aliases:
        key = rng.choice(sorted(aliases))
        aliases[key] = rng.choice([key, rng.choice(keys), 1, None, [key]])
    else:
        header["aliases"] = rng.choice([[], None, "x", {k: k for k in keys[:3]}])
    return f"aliases op {op}"


def _lie_checksum(rng: random.Random, header: dict) -> str:
    checksum = header["checksum"]
    value = checksum["tensors"]
    op = rng.randrange(5)
    if op == 0:
        checksum["tensors"] = value[:-1] + ("0" if value[-1] != "0" else "1")
    elif op == 1:
        checksum["tensors"] = value.upper()
    elif op == 2:
        checksum["algorithm"] = rng.choice(["md5", "SHA256", None, ""])
    elif op == 3:
        checksum["tensors"] = rng.choice([value[:-1], None, 1, "", value + "0"])
    else:
        header["checksum"] = rng.choice([None, [], value])
    return f"checksum op {op}"


def _lie_counts_and_sizes(rng: random.Random, header: dict) -> str:
    field = rng.choice(["fp32_bytes", "layers", "plan", "format", "tensors"])
    header[field] = _nasty(rng) if rng.random() < 0.5 else _tweak(rng, header[field])
    return f"{field} replaced"


def _lie_duplicate_keys(rng: random.Random, header: dict) -> tuple[str, str]:
    """JSON text with a key given twice; Python keeps the last, so the file must agree with it."""
    text = _dumps(header)
    where = rng.choice(["version", "architecture", "tensors", "entry"])
    if where == "entry":
        key = rng.choice(_entries(header))
        twin = json.dumps({key: {**header["tensors"][key], "shape": [1]}})[1:-1]
        inner = json.dumps(header["tensors"])
        text = text.replace(inner, "{" + twin + ", " + inner[1:], 1)
    else:
        twin = _dumps({where: _nasty(rng)})[1:-1]
        text = "{" + twin + ", " + text[1:]
    return text, f"duplicate key {where}"


def _lie_layers(rng: random.Random, header: dict) -> str:
    layers = header["layers"]
    op = rng.randrange(4)
    if op == 0 and layers:
        layers.append(dict(rng.choice(layers)))
    elif op == 1 and layers:
        rng.choice(layers)[rng.choice(["index", "name", "type"])] = _nasty(rng)
    elif op == 2:
        layers.append({"index": 99, "name": "nothing.here", "type": "Conv2d"})
    else:
        layers.reverse()
    return f"layers op {op}"


_LIES = {
    "shape": _lie_shape, "n_clusters": _lie_n_clusters, "bits": _lie_bits, "coding": _lie_coding,
    "kind": _lie_kind, "dtype": _lie_dtype, "version": _lie_version, "architecture": _lie_architecture,
    "aliases": _lie_aliases, "checksum": _lie_checksum, "sizes": _lie_counts_and_sizes,
    "duplicate_keys": _lie_duplicate_keys, "layers": _lie_layers,
}


# tensors (checksum recomputed) ----------------------------------------------------------------


def _tensor_mutation(rng: random.Random, seed: Seed) -> Mutation:
    header = copy.deepcopy(seed.header)
    tensors = dict(seed.tensors)
    name = rng.choice(sorted(_TENSOR_OPS))
    what = _TENSOR_OPS[name](rng, header, tensors)
    if what is None:  # the operator does not apply to this seed: garble a codebook instead
        name, what = "centroids", _op_centroids(rng, header, tensors)
    header["checksum"]["tensors"] = layout.tensors_digest(tensors)
    header["checksum"]["header"] = layout.header_digest(header)
    data = safetensors.torch.save(tensors, metadata={"labelless": json.dumps(header)})
    return Mutation(data, "tensors", f"{name}: {what}", allow_different=True)


def _op_centroids(rng: random.Random, header: dict, tensors: dict) -> str:
    key = rng.choice(_entries(header, "quantized"))
    codebook = tensors[f"{key}::codebook"].clone()
    value = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30, None])
    if value is None:
        codebook.copy_(torch.randn(codebook.shape))
    else:
        codebook[rng.randrange(codebook.numel())] = value
    tensors[f"{key}::codebook"] = codebook
    return f"{key} codebook gets {value}"


def _indexed_entry(rng: random.Random, header: dict, coding: str) -> str | None:
    """A random quantized tensor of ``coding`` that has index data (k > 1), or None."""
    keys = [k for k in _entries(header, "quantized", coding=coding) if header["tensors"][k]["bits"]]
    return rng.choice(keys) if keys else None


def _op_packed_indices(rng: random.Random, header: dict, tensors: dict) -> str | None:
    key = _indexed_entry(rng, header, "packed")
    if key is None:
        return None
    data = tensors[f"{key}::indices"].clone()
    spots = rng.choice([[0], [data.numel() - 1], list(range(data.numel()))])
    for spot in spots:
        data[spot] = rng.randrange(256)
    tensors[f"{key}::indices"] = data
    return f"{key} {len(spots)} index bytes random"


def _op_resize_codebook(rng: random.Random, header: dict, tensors: dict) -> str:
    key = rng.choice(_entries(header, "quantized"))
    entry = header["tensors"][key]
    k = entry["n_clusters"]
    new_k = rng.choice([max(1, k - 1), max(1, k // 2), 1, k + 1, 2 * k])
    codebook = tensors[f"{key}::codebook"]
    grown = torch.cat([codebook, torch.randn(max(0, new_k - k)).to(codebook.dtype)])
    tensors[f"{key}::codebook"] = grown[:new_k].clone()
    entry.update(n_clusters=new_k, bits=coding.index_bits(new_k))
    if entry["coding"] == "ans" and f"{key}::counts" in tensors:
        counts = tensors[f"{key}::counts"]
        more = torch.ones(max(0, new_k - k), dtype=counts.dtype)
        tensors[f"{key}::counts"] = torch.cat([counts, more])[:new_k].clone()
    if entry["bits"] == 0:
        tensors.pop(f"{key}::indices", None)
        tensors.pop(f"{key}::counts", None)
    return f"{key} k {k} -> {new_k}"


def _op_ans_data(rng: random.Random, header: dict, tensors: dict) -> str | None:
    key = _indexed_entry(rng, header, "ans")
    if key is None:
        return None
    data = tensors[f"{key}::indices"].numpy().copy()
    op = rng.randrange(6)
    if op == 0:
        data = np.frombuffer(rng.randbytes(data.size), np.uint8).copy()
    elif op == 1:
        data = data[: rng.randrange(data.size + 1) // 4 * 4]
    elif op == 2:
        data = np.concatenate([data, np.frombuffer(rng.randbytes(4 * rng.choice([1, 10])), np.uint8)])
    elif op == 3:
        data[-4:] = 0
    elif op == 4:
        data = data[:-1]
    else:
        data[rng.randrange(data.size)] ^= 1 << rng.randrange(8)
    tensors[f"{key}::indices"] = torch.from_numpy(np.ascontiguousarray(data))
    return f"{key} ANS data op {op}"


def _op_counts(rng: random.Random, header: dict, tensors: dict) -> str | None:
    key = _indexed_entry(rng, header, "ans")
    if key is None:
        return None
    counts = tensors[f"{key}::counts"].clone()
    op = rng.randrange(6)
    i, j = rng.randrange(counts.numel()), rng.randrange(counts.numel())
    if op == 0:
        counts[i] += rng.choice([1, -1, 1000])
    elif op == 1:
        counts[i] = rng.choice([0, -1, -(2**62)])
    elif op == 2 and counts.numel() >= 4:  # 4 * 2**62 wraps an int64 sum back to the right total
        counts[:4] += 2**62
    elif op == 3:
        counts[[i, j]] = counts[[j, i]]
    elif op == 4:
        counts = counts.flip(0).clone()
    else:
        counts = counts.to(rng.choice([torch.int32, torch.float64]))
    tensors[f"{key}::counts"] = counts
    return f"{key} counts op {op}"


def _op_dense_values(rng: random.Random, header: dict, tensors: dict) -> str:
    key = rng.choice(_entries(header, "dense"))
    value = tensors[key].clone()
    if value.is_floating_point():
        value.copy_(rng.choice([torch.randn(value.shape), torch.full(value.shape, float("nan"))]).to(value.dtype))
    else:
        value.fill_(rng.randrange(-5, 5))
    tensors[key] = value
    return f"{key} values"


def _op_dense_dtype(rng: random.Random, header: dict, tensors: dict) -> str:
    key = rng.choice(_entries(header, "dense"))
    name = rng.choice(["float64", "float16", "int32", "int64", "bool", "bfloat16"])
    tensors[key] = tensors[key].to(layout.DTYPES[name])
    header["tensors"][key].update(dtype=name, stored_dtype=name)
    return f"{key} stored and declared {name}"


def _op_quantize_dense(rng: random.Random, header: dict, tensors: dict) -> str:
    """A dense tensor (parameter or buffer) written as quantized, k = 1 or 2, coherently."""
    key = rng.choice(_entries(header, "dense"))
    value = tensors.pop(key).float().reshape(-1)
    k = min(2, max(1, value.numel()))
    ends = torch.stack([value.min(), value.max()]) if value.numel() else torch.zeros(1)
    tensors[f"{key}::codebook"] = ends[:k].clone()
    if k == 2:
        indices = (value > (value.min() + value.max()) / 2).numpy().astype(np.uint8)
        tensors[f"{key}::indices"] = torch.from_numpy(coding.pack(indices, 1))
    header["tensors"][key] = {"kind": "quantized", "shape": header["tensors"][key]["shape"], "n_clusters": k,
                              "bits": coding.index_bits(k), "coding": "packed", "codebook_dtype": "float32"}
    return f"{key} quantized with k={k}"


def _op_drop_or_add(rng: random.Random, header: dict, tensors: dict) -> str:
    if rng.random() < 0.5:
        key = rng.choice(_entries(header))
        del header["tensors"][key]
        for name in [n for n in tensors if n == key or n.startswith(key + "::")]:
            del tensors[name]
        return f"drop {key}"
    key = rng.choice(["extra.weight", "fc.weight", "conv.bias", "x"])
    header["tensors"].setdefault(key, {"kind": "dense", "shape": [3], "dtype": "float32", "stored_dtype": "float32"})
    tensors.setdefault(key, torch.zeros(3))
    return f"add {key}"


def _op_alias(rng: random.Random, header: dict, tensors: dict) -> str | None:
    """Replace one tensor by an alias of another of the same shape (a well-formed file)."""
    shapes: dict[tuple, list[str]] = {}
    for key, entry in header["tensors"].items():
        shapes.setdefault(tuple(entry["shape"]), []).append(key)
    pairs = sorted(keys for keys in shapes.values() if len(keys) > 1)
    if not pairs:
        return None
    key, target = rng.sample(rng.choice(pairs), 2)
    del header["tensors"][key]
    for name in [n for n in tensors if n == key or n.startswith(key + "::")]:
        del tensors[name]
    header["aliases"][key] = target
    return f"{key} becomes an alias of {target}"


def _op_reshape(rng: random.Random, header: dict, tensors: dict) -> str:
    key = rng.choice(_entries(header))
    entry = header["tensors"][key]
    shape = [math.prod(entry["shape"])] if entry["shape"] else [1]
    entry["shape"] = shape
    if entry["kind"] == "dense":
        tensors[key] = tensors[key].reshape(shape).clone()
    return f"{key} reshaped to {shape}"


_TENSOR_OPS = {
    "centroids": _op_centroids, "packed_indices": _op_packed_indices, "resize_codebook": _op_resize_codebook,
    "ans_data": _op_ans_data, "counts": _op_counts, "dense_values": _op_dense_values,
    "dense_dtype": _op_dense_dtype, "quantize_dense": _op_quantize_dense, "drop_or_add": _op_drop_or_add,
    "alias": _op_alias, "reshape": _op_reshape,
}


# -- the oracle ----------------------------------------------------------------------------


@dataclasses.dataclass
class Reference:
    """What the unmutated seed loads to."""

    state: dict[str, torch.Tensor]
    output: torch.Tensor
    spec: Any
    x: torch.Tensor


def reference(seed: Seed) -> Reference:
    model = _load(seed, seed.path)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        output = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return Reference(state, output, getattr(model, "labelless_spec", None), x)


def _load(seed: Seed, path: Path) -> nn.Module:
    return labelless.load(path, model=seed.recipe.build() if seed.recipe.custom else None)


_AUDITED = ("pickle.find_class", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "ctypes.dlopen")
_audit_events: list[str] = []
_audit_armed = [False]


def _audit(event: str, args: tuple) -> None:
    if not _audit_armed[0]:
        return
    if event.startswith(_AUDITED) or (event in ("exec", "compile") and _code_from_text(event, args)):
        _audit_events.append(event)


def _code_from_text(event: str, args: tuple) -> bool:
    """exec/compile of code built from a string (a module import runs code from a file)."""
    filename = getattr(args[0], "co_filename", "") if event == "exec" else str(args[1])
    return filename.startswith("<")


def install_audit_hook() -> None:
    """Record unpickling, processes and code compiled from text while a case runs."""
    sys.addaudithook(_audit)


def run_case(seed: Seed, ref: Reference, mutation: Mutation, folder: Path) -> dict[str, Any]:
    """Feed one mutated file to read, inspect and load; classify what happened."""
    path = folder / "case.lless"
    path.write_bytes(mutation.data)
    _audit_events.clear()
    result = _classify(seed, ref, mutation, path)
    if _audit_events:
        result = {"outcome": "failure", "why": f"code execution audit events {sorted(set(_audit_events))[:5]}"}
    return result


def _classify(seed: Seed, ref: Reference, mutation: Mutation, path: Path) -> dict[str, Any]:
    calls = {"read": lambda: labelless.read(path), "inspect": lambda: labelless.inspect(path),
             "load": lambda: _load(seed, path)}
    results = {}
    for name, call in calls.items():
        try:
            _audit_armed[0] = True  # only while labelless runs (a traceback, for one, compiles)
            results[name] = ("ok", call())
        except FileFormatError as exc:
            results[name] = ("rejected", exc)
        except LabellessError as exc:
            results[name] = ("needs_model" if "custom model" in str(exc) else "failure", exc)
        except Exception as exc:  # anything else is what this fuzzer looks for
            results[name] = ("failure", exc)
        finally:
            _audit_armed[0] = False
        if name == "read" and results[name][0] == "rejected":
            break  # inspect and load call read first: the same error
    return _verdict(results, ref, mutation)


def _verdict(results: dict, ref: Reference, mutation: Mutation) -> dict[str, Any]:
    for name, (status, value) in results.items():
        if status == "failure":
            return {"outcome": "failure", "why": f"{name} raised {type(value).__name__}: {_line(value)}",
                    "traceback": "".join(traceback.format_exception(value))[-4000:]}
        if status in ("rejected", "needs_model") and ("\n" in str(value) or len(str(value)) > MAX_MESSAGE):
            return {"outcome": "failure", "why": f"{name}: the message is not one short line: {str(value)[:200]!r}"}
    first = next((name for name, (status, _) in results.items() if status != "ok"), None)
    status, model = results.get("load", ("skipped", None))
    if status != "ok":
        outcome = "rejected_needs_model" if status == "needs_model" else "rejected"
        return {"outcome": outcome, "stage": first, "message": _line(results[first][1])}
    verdict = _compare(model, ref, mutation.allow_different)
    if results["inspect"][0] == "rejected":
        verdict["inspect_rejected"] = _line(results["inspect"][1])
    return verdict


def _compare(model: nn.Module, ref: Reference, allow_different: bool) -> dict[str, Any]:
    try:
        with torch.no_grad():
            output = model(ref.x)
    except Exception as exc:
        return {"outcome": "failure", "why": f"the loaded model does not run: {type(exc).__name__}: {_line(exc)}"}
    state = model.state_dict()
    same_state = state.keys() == ref.state.keys() and all(_bit_equal(state[k], v) for k, v in ref.state.items())
    if same_state and _bit_equal(output, ref.output):
        spec = getattr(model, "labelless_spec", None)
        return {"outcome": "loaded_identical", "spec_changed": spec != ref.spec}
    if not allow_different:
        why = "the file loads a model that differs from the one saved" + _spec_diff(model, ref)
        return {"outcome": "failure", "why": why}
    problem = _malformed(state, ref, output)
    if problem:
        return {"outcome": "failure", "why": f"the loaded model is malformed: {problem}"}
    return {"outcome": "loaded_valid_different"}


def _spec_diff(model: nn.Module, ref: Reference) -> str:
    spec = getattr(model, "labelless_spec", None)
    if spec is None or ref.spec is None or spec == ref.spec:
        return ""
    fields = [f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(ref.spec, f.name)]
    return f" (same tensors, architecture {fields} changed: the checksum does not cover the header)"


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaN equals NaN, -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _malformed(state: dict[str, torch.Tensor], ref: Reference, output: torch.Tensor) -> str | None:
    """Each reference tensor is there with its shape and dtype, or quantized (a parameter)."""
    if output.shape != ref.output.shape:
        return f"output shape {tuple(output.shape)}"
    expected = set()
    for key, value in ref.state.items():
        base = key.removesuffix("_centroids").removesuffix("_indices")
        if key.endswith(("_centroids", "_indices")) and base + "_centroids" in ref.state:
            continue  # checked through the quantized tensor's plain name below
        expected.add(key)
    seen = set()
    for key in sorted(expected | {k.removesuffix("_centroids") for k in ref.state if k.endswith("_centroids")}):
        if key in state:
            seen.add(key)
            continue
        centroids, indices = state.get(f"{key}_centroids"), state.get(f"{key}_indices")
        if centroids is None or indices is None:
            return f"{key} is missing"
        if indices.numel() and int(indices.max()) >= centroids.numel():
            return f"{key} has an index >= k"
        seen.update({f"{key}_centroids", f"{key}_indices"})
    extra = sorted(set(state) - seen)
    return f"unexpected tensors {extra[:3]}" if extra else None


def _line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# -- running -------------------------------------------------------------------------------


def _peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_mb(field: str = "VmHWM") -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class CaseRunner:
    """Seeds, references and a scratch folder: runs cases in this process."""

    def __init__(self, seeds: list[Seed], base_seed: int, failures: Path):
        self.seeds, self.base_seed, self.failures = seeds, base_seed, failures
        self.refs = {s.recipe.name: reference(s) for s in seeds}
        self.scratch = Path(tempfile.mkdtemp(prefix="lless-fuzz-"))

    def warm_up(self) -> None:
        """Lazy imports and JIT compiles done before the clock and the audit start."""
        for seed in self.seeds:
            labelless.inspect(seed.path)
        for dtype in (np.uint8, np.int16, np.int32):  # every numba signature the reader can use
            coding.unpack(np.zeros(1, np.uint8), 1, 8, 2, dtype)

    def run(self, case: int) -> dict[str, Any]:
        rng = case_rng(self.base_seed, case)
        seed = choose_seed(rng, self.seeds)
        mutation = mutate(rng, seed)
        _peak_rss_reset()
        start = time.perf_counter()
        result = run_case(seed, self.refs[seed.recipe.name], mutation, self.scratch)
        result.update(case=case, seed=seed.recipe.name, family=mutation.family, what=mutation.what,
                      seconds=time.perf_counter() - start, peak_rss_mb=_rss_mb())
        if result["outcome"] == "failure":
            result["reproducer"] = save_failure(self.failures, self.base_seed, case, mutation, result)
        return result


def save_failure(folder: Path, base_seed: int, case: int, mutation: Mutation, result: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"seed{base_seed}-case{case}"
    stem.with_suffix(".lless").write_bytes(mutation.data)
    info = {k: v for k, v in result.items() if k != "reproducer"}
    stem.with_suffix(".json").write_text(json.dumps({**info, "family": mutation.family, "what": mutation.what,
                                                     "allow_different": mutation.allow_different}, indent=2))
    return str(stem.with_suffix(".lless"))


def _worker(conn, seeds_dir: str, recipe_names: list[str], base_seed: int, failures: str) -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    recipes = [r for r in RECIPES if r.name in recipe_names]
    runner = CaseRunner(prepare_seeds(Path(seeds_dir), recipes), base_seed, Path(failures))
    runner.warm_up()
    install_audit_hook()
    conn.send({"ready": True, "rss_mb": _rss_mb("VmRSS")})
    while True:
        case = conn.recv()
        if case is None:
            return
        conn.send(runner.run(case))


class Pool:
    """One worker process at a time per slot; a case past its time limit kills its worker."""

    def __init__(self, args: argparse.Namespace, recipe_names: list[str]):
        self.args, self.recipe_names = args, recipe_names
        self.context = multiprocessing.get_context("spawn")
        self.process, self.conn, self.baseline_rss = None, None, float("nan")

    def start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(target=_worker, daemon=True, args=(
            child, str(self.args.seeds_dir), self.recipe_names, self.args.seed, str(self.args.failures)))
        self.process.start()
        child.close()  # so that the worker's death reads as end-of-file here
        self.conn = parent
        if not self._wait(600):
            raise RuntimeError("the fuzz worker did not start: see its traceback above")
        self.baseline_rss = parent.recv()["rss_mb"]

    def _wait(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                return True
            if not self.process.is_alive():
                return self.conn.poll()
        return False

    def run(self, case: int) -> dict[str, Any] | None:
        """The case's result, or None when the worker died or ran past the limit (then restarted)."""
        if self.process is None:
            self.start()
        self.conn.send(case)
        if self._wait(self.args.timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        self.stop(kill=True)
        return None

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.conn.send(None)
        self.process.join(30)
        self.process = None


def summarise(results: list[dict], seconds: float, args: argparse.Namespace, baseline_rss: float) -> dict:
    outcomes = Counter(r["outcome"] for r in results)
    by_family = {f: dict(Counter(r["outcome"] for r in results if r["family"] == f))
                 for f in sorted({r["family"] for r in results})}
    messages = Counter(_normalise(r.get("message", "")) for r in results if r["outcome"].startswith("rejected"))
    slowest = max(results, key=lambda r: r["seconds"])
    biggest = max(results, key=lambda r: r.get("peak_rss_mb", 0))
    return {
        "cases": len(results), "seed": args.seed, "timeout_s": args.timeout,
        "seeds": [r.name for r in _recipes(args)],
        "outcomes": dict(outcomes), "failures": outcomes.get("failure", 0), "by_family": by_family,
        "rejected_at": dict(Counter(r.get("stage") for r in results if r["outcome"] == "rejected")),
        "loaded_identical_with_other_architecture_fields": sum(bool(r.get("spec_changed")) for r in results),
        "inspect_rejected_but_load_ok": sum("inspect_rejected" in r for r in results),
        "total_seconds": round(seconds, 1),
        "max_case_seconds": round(slowest["seconds"], 3), "slowest_case": _brief(slowest),
        "max_case_peak_rss_mb": round(biggest.get("peak_rss_mb", float("nan")), 1), "biggest_case": _brief(biggest),
        "worker_baseline_rss_mb": round(baseline_rss, 1),
        "failure_cases": [_brief(r) for r in results if r["outcome"] == "failure"][:200],
        "top_rejections": messages.most_common(40),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "labelless": labelless.__version__},
    }


def _brief(result: dict) -> dict:
    keys = ("case", "seed", "family", "what", "outcome", "why", "seconds", "peak_rss_mb", "reproducer")
    return {k: result[k] for k in keys if k in result}


def _normalise(message: str) -> str:
    """A rejection message without its path and numbers, to count which checks fire."""
    message = message.split(".lless: ", 1)[-1]
    return "".join("#" if c.isdigit() else c for c in message)[:160]


def _recipes(args: argparse.Namespace) -> list[SeedRecipe]:
    return SMALL_RECIPES if args.small else RECIPES


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("LABELLESS_PROGRESS", "0")
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # read by the workers' numba
    logging.disable(logging.WARNING)
    recipes = _recipes(args)
    prepare_seeds(args.seeds_dir, recipes)
    pool = Pool(args, [r.name for r in recipes])
    pool.start()
    results, start = [], time.perf_counter()
    for case in range(args.cases):
        result = pool.run(case) or _lost_case(args, recipes, case, pool)
        results.append(result)
        if result["outcome"] == "failure":
            print(f"case {case}: FAILURE {result.get('why')} [{result['what']}]", file=sys.stderr)
        if (case + 1) % 500 == 0:
            counts = dict(Counter(r["outcome"] for r in results))
            print(f"{case + 1} cases, {time.perf_counter() - start:.0f} s: {counts}", file=sys.stderr)
    pool.stop()
    summary = summarise(results, time.perf_counter() - start, args, pool.baseline_rss)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("cases", "outcomes", "total_seconds", "max_case_seconds",
                                              "max_case_peak_rss_mb")}))
    return 1 if summary["failures"] else 0


def _lost_case(args: argparse.Namespace, recipes: list[SeedRecipe], case: int, pool: Pool) -> dict:
    """A case whose worker died or ran out of time: regenerate its file and save it."""
    seeds = prepare_seeds(args.seeds_dir, recipes)
    rng = case_rng(args.seed, case)
    seed = choose_seed(rng, seeds)
    mutation = mutate(rng, seed)
    result = {"outcome": "failure", "why": f"no answer within {args.timeout} s (timeout or crash)", "case": case,
              "seed": seed.recipe.name, "family": mutation.family, "what": mutation.what, "seconds": args.timeout}
    result["reproducer"] = save_failure(args.failures, args.seed, case, mutation, result)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="number of fuzz cases (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: (seed, case) fixes each mutation")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one case may take (default 30)")
    parser.add_argument("--small", action="store_true", help="skip the resnet18 seeds (faster)")
    parser.add_argument("--output", type=Path, default=RESULTS / "fuzz_lless.json")
    parser.add_argument("--failures", type=Path, default=RESULTS / "fuzz_failures")
    parser.add_argument("--seeds-dir", type=Path, default=Path(tempfile.gettempdir()) / "labelless-fuzz-seeds")
    return parser


if __name__ == "__main__":
    sys.exit(main())

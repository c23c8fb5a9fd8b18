"""The .lless file: bit-exact round trip, real sizes, and clean rejection of bad files."""

from __future__ import annotations

import json
import math
import os

import pytest
import safetensors.torch
import torch

import labelless
from labelless import FileFormatError, inspect, load, quantize, save
from labelless.coding import index_bits

PLAN = [{"layers": "*", "weights": 16, "bias": 1}, {"layers": "1", "weights": 256}, {"layers": "21", "weights": 2}]


@pytest.fixture
def quantized(model):
    return quantize(model, PLAN)


@pytest.mark.parametrize("entropy", ["none", "ans"])
def test_round_trip_is_bit_exact(tmp_path, quantized, images, entropy):
    save(quantized, tmp_path / "m.lless", entropy=entropy)
    restored = load(tmp_path / "m.lless")
    with torch.no_grad():
        assert torch.equal(quantized.eval()(images), restored(images))
    for key, qt in labelless.quantized_tensors(quantized).items():
        again = labelless.quantized_tensors(restored)[key]
        assert torch.equal(qt.centroids, again.centroids) and torch.equal(qt.indices, again.indices)


def test_fp16_storage_loads_the_rounded_model(tmp_path, quantized, images):
    save(quantized, tmp_path / "h.lless", codebook_dtype="float16", dense_dtype="float16")
    restored = load(tmp_path / "h.lless")
    for qt in labelless.quantized_tensors(quantized).values():
        qt.centroids.data = qt.centroids.data.half().float()
    for name, buffer in quantized.named_buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.half().float()
    for name, param in quantized.named_parameters():
        if not name.endswith("_centroids"):
            param.data = param.data.half().float()
    with torch.no_grad():
        assert torch.equal(quantized(images), restored(images))


def test_sizes_add_up_to_the_file_on_disk(tmp_path, quantized, model):
    report = save(quantized, tmp_path / "m.lless")
    size = os.path.getsize(tmp_path / "m.lless")
    assert report["total_bytes"] == size
    assert report["header_bytes"] + report["other_bytes"] + sum(r["bytes"] for r in report["layers"]) == size
    assert report["fp32_bytes"] == len(safetensors.torch.save(model.state_dict()))
    assert report["size_reduction"] == pytest.approx(1 - size / report["fp32_bytes"])


def test_indices_are_packed_at_ceil_log2_k_bits_and_absent_for_k1(tmp_path, quantized):
    save(quantized, tmp_path / "m.lless")
    lless = labelless.read(tmp_path / "m.lless")
    for key, entry in lless.header["tensors"].items():
        if entry["kind"] != "quantized":
            continue
        k = entry["n_clusters"]
        assert entry["bits"] == index_bits(k) == (math.ceil(math.log2(k)) if k > 1 else 0)
        name = f"{key}::indices"
        if k == 1:
            assert name not in lless.tensors
        else:
            assert lless.tensors[name].numel() == math.ceil(math.prod(entry["shape"]) * entry["bits"] / 8)


def test_ans_coding_is_smaller_and_reports_the_packed_size(tmp_path, quantized):
    packed = save(quantized, tmp_path / "p.lless")
    coded = save(quantized, tmp_path / "a.lless", entropy="ans")
    assert coded["total_bytes"] < packed["total_bytes"]
    assert coded["packed_total_bytes"] == pytest.approx(packed["total_bytes"], rel=0.01)


def test_ans_codes_a_tensor_only_where_it_is_smaller_so_the_sizer_bounds_every_file(tmp_path):
    from torch import nn

    from labelless.sizing import FileSizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(256, 256).pow(6))  # most weights near 0: skewed indices, ANS pays
        model[2].weight.copy_(torch.arange(2048.0).reshape(8, 256))  # every value its own: uniform indices
    plan = [{"layers": "1", "weights": 16}, {"layers": "2", "weights": 256}]
    q = quantize(model, plan)
    report = save(q, tmp_path / "a.lless", entropy="ans")
    codings = {k: e["coding"] for k, e in labelless.read(tmp_path / "a.lless").header["tensors"].items()
               if e["kind"] == "quantized"}
    # 256 uniform values cost 8 bits packed; their ANS stream plus 256 int64 counts would cost more
    assert codings == {"0.weight": "ans", "2.weight": "packed"}
    bound = FileSizer(model).size({"0.weight": 16, "2.weight": 256}, plan=labelless.Plan.from_data(plan).to_data())
    assert report["total_bytes"] < bound == save(q, tmp_path / "p.lless")["total_bytes"]


def test_header_records_architecture_plan_and_version(tmp_path, quantized, spec):
    save(quantized, tmp_path / "m.lless")
    header = labelless.read(tmp_path / "m.lless").header
    assert header["version"] == 1 and header["format"] == "labelless"
    assert labelless.ModelSpec.from_dict(header["architecture"]) == spec
    assert header["plan"] == labelless.Plan.from_data(PLAN).to_data()


def test_custom_module_needs_its_skeleton(tmp_path, tiny):
    from conftest import TinyNet

    q = quantize(tiny, [{"layers": "*", "weights": 4}])
    save(q, tmp_path / "t.lless")
    with pytest.raises(labelless.LabellessError, match="custom model"):
        load(tmp_path / "t.lless")
    restored = load(tmp_path / "t.lless", model=TinyNet())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(q(x), restored(x))


def _rewrite_header(src, dst, change):
    data = bytearray(open(src, "rb").read())
    length = int.from_bytes(data[:8], "little")
    outer = json.loads(data[8 : 8 + length])
    header = json.loads(outer["__metadata__"]["labelless"])
    change(header)
    header["checksum"]["header"] = labelless.layout.header_digest(header)  # a lie that is signed
    outer["__metadata__"]["labelless"] = json.dumps(header)
    raw = json.dumps(outer).encode()
    raw += b" " * (-len(raw) % 8)
    open(dst, "wb").write(len(raw).to_bytes(8, "little") + raw + data[8 + length :])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2), "truncated|unreadable|corrupt"),
        (lambda p: open(p, "r+b").truncate(5), "truncated"),
        (lambda p: _flip(p, -100), "checksum|corrupt"),
    ],
)
def test_damaged_files_are_rejected(tmp_path, quantized, damage, message):
    path = tmp_path / "m.lless"
    save(quantized, path)
    damage(path)
    with pytest.raises(FileFormatError, match=message):
        load(path)


def _flip(path, offset):
    with open(path, "r+b") as handle:
        handle.seek(offset, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_wrong_version_and_architecture_are_rejected(tmp_path, quantized):
    save(quantized, tmp_path / "m.lless")
    _rewrite_header(tmp_path / "m.lless", tmp_path / "v.lless", lambda h: h.update(version=99))
    with pytest.raises(FileFormatError, match="version 99 is not supported"):
        load(tmp_path / "v.lless")
    _rewrite_header(tmp_path / "m.lless", tmp_path / "a.lless", lambda h: h["architecture"].update(num_classes=11))
    with pytest.raises(FileFormatError, match="do not fit the model"):
        load(tmp_path / "a.lless")


def test_a_file_that_is_not_lless_is_rejected(tmp_path, model):
    safetensors.torch.save_file(model.state_dict(), tmp_path / "dense.safetensors")
    (tmp_path / "text.lless").write_text("hello")
    with pytest.raises(FileFormatError, match="not a .lless file"):
        load(tmp_path / "dense.safetensors")
    with pytest.raises(FileFormatError, match="not a .lless file"):
        inspect(tmp_path / "text.lless")

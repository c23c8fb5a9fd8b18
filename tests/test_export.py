"""ONNX export: the compressed graph is checked, as small as the .lless file, and runs like the model."""

from __future__ import annotations

import copy
import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import labelless
from labelless import cli
from labelless.export import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
SPEC = labelless.ModelSpec("resnet18", num_classes=10, in_channels=1, small_input=True)
TOLERANCE = 1e-5  # max |onnx - torch| relative to max |output|


def fashion_images(spec: labelless.ModelSpec, n: int = 32) -> np.ndarray:
    """The first ``n`` Fashion-MNIST test images as the model's input (n, C, S, S), normalised.

    Falls back to seeded noise where the data set is not installed.
    """
    if not FASHION.is_file():
        return torch.randn(n, spec.in_channels, spec.image_size, spec.image_size).numpy()
    with gzip.open(FASHION) as handle:
        _, _, rows, cols = np.frombuffer(handle.read(16), ">u4")  # magic, count, rows, cols
        pixels = np.frombuffer(handle.read(n * int(rows) * int(cols)), np.uint8)
    x = torch.from_numpy(pixels.reshape(n, 1, rows, cols).astype(np.float32) / 255)  # (n, 1, 28, 28)
    pad = max(0, spec.image_size - int(rows)) // 2
    x = F.interpolate(F.pad(x, (pad,) * 4), size=spec.image_size, mode="bilinear")
    x = x.repeat(1, spec.in_channels, 1, 1)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (spec.mean, spec.std))
    return ((x - mean) / std).numpy()


def run_onnx(path: Path, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(outputs, {"input": x})


def assert_matches(path: Path, model: torch.nn.Module, x: np.ndarray) -> None:
    (got,) = run_onnx(path, x, ["logits"])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def write_lless(model: torch.nn.Module, plan: list, path: Path) -> Path:
    labelless.save(labelless.quantize(model, plan), path)
    return path


@pytest.fixture(scope="module")
def lless16(tmp_path_factory) -> Path:
    """resnet18 (32 px, 1 channel, 10 classes), weights at 16 centroids, biases at 1."""
    torch.manual_seed(0)
    model = labelless.build_model(SPEC).eval()
    path = tmp_path_factory.mktemp("export") / "r18.lless"
    return write_lless(model, [{"layers": "*", "weights": 16, "bias": 1}], path)


def test_compressed_graph_passes_the_checker_and_matches_pytorch(lless16, tmp_path):
    out = tmp_path / "r18.onnx"
    report = export_onnx(lless16, out)
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    n_quantized = len(labelless.quantized_tensors(labelless.load(lless16)))
    assert report["compressed_tensors"] == n_quantized == 22 and report["kept_dense_tensors"] == 0
    assert report["onnx_bytes"] == out.stat().st_size and report["lless_bytes"] == lless16.stat().st_size
    assert {"BitShift", "BitwiseAnd", "Gather"} <= {node.op_type for node in proto.graph.node}
    model = labelless.load(lless16)
    x = fashion_images(SPEC, 32)
    assert_matches(out, model, x)
    assert_matches(out, model, x[:1])  # the batch dimension is dynamic


@pytest.mark.parametrize("k", [2, 4, 16, 256])
def test_compressed_onnx_is_at_most_a_quarter_larger_than_the_lless_file(k, tmp_path):
    model = labelless.build_model(SPEC).eval()
    lless = write_lless(model, [{"layers": "*", "weights": k, "bias": 1}], tmp_path / "m.lless")
    report = export_onnx(lless, tmp_path / "m.onnx")
    assert report["kept_dense_tensors"] == 0
    assert report["ratio"] == report["onnx_bytes"] / lless.stat().st_size <= 1.25


@pytest.mark.parametrize("dense", [False, True])
def test_a_model_past_protobufs_2_gib_is_written_with_its_tensors_beside_it(lless16, tmp_path, monkeypatch, dense):
    from labelless import onnxfile

    monkeypatch.setattr(onnxfile, "PROTOBUF_LIMIT", 100_000)  # a ResNet-18 stands in for a 2 GiB network
    out = tmp_path / "big.onnx"
    report = export_onnx(lless16, out, dense=dense)
    data = tmp_path / "big.onnx.data"
    assert report["files"] == [str(out), str(data)] and out.stat().st_size < 100_000 < data.stat().st_size
    assert report["onnx_bytes"] == out.stat().st_size + data.stat().st_size
    assert report["dynamic_size"]  # the second-size check ran through a file as well
    onnx.checker.check_model(str(out), full_check=True)
    model = labelless.load(lless16)
    x = fashion_images(SPEC, 8)
    assert_matches(out, model, x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # nothing left over


def test_dense_export_matches_and_is_large(lless16, tmp_path):
    out = tmp_path / "dense.onnx"
    report = export_onnx(lless16, out, dense=True, opset=17)
    proto = onnx.load(out)
    assert not [i.name for i in proto.graph.initializer if i.name.endswith("::indices")]
    assert report["ratio"] > 6 and report["compressed_tensors"] == 0
    assert_matches(out, labelless.load(lless16), fashion_images(SPEC, 8))


def test_every_bit_width_rebuilds_the_exact_quantized_weights(tiny, tmp_path):
    # k = 1..2000: 0 to 11 bits, widths that do and do not divide 8, counts not a multiple of 8
    plan = [{"layers": "conv", "weights": 3, "bias": 1}, {"layers": "depthwise", "weights": 8},
            {"layers": "fc1", "weights": 2000, "bias": 33}, {"layers": "fc2", "weights": 100, "bias": 2}]
    model = labelless.quantize(tiny, plan)
    x = torch.randn(3, 1, 8, 8)
    out = tmp_path / "tiny.onnx"
    report = export_onnx(model, out, example_input=x)
    assert report["lless_bytes"] is None and report["compressed_tensors"] == 7
    proto = onnx.load(out)
    quantized = labelless.quantized_tensors(model)
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(key, onnx.TensorProto.FLOAT, None) for key in quantized)
    onnx.save(proto, out)
    got = run_onnx(out, x.numpy(), list(quantized))
    for (key, qt), value in zip(quantized.items(), got):
        assert np.array_equal(value, qt.dense().numpy()), key
    assert_matches(out, model, x.numpy())


def test_single_centroid_tensors_store_no_index_data(tiny, tmp_path):
    model = labelless.quantize(tiny, [{"layers": "*", "weights": 1, "bias": 1}])
    out = tmp_path / "k1.onnx"
    export_onnx(model, out, example_input=torch.zeros(1, 1, 8, 8))
    proto = onnx.load(out)
    assert not [i.name for i in proto.graph.initializer if i.name.endswith("::indices")]
    assert sum(node.op_type == "Expand" for node in proto.graph.node) == 7


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 18, 20])
def test_packed_indices_decode_exactly_for_every_bit_width(bits, tmp_path):
    from labelless.export import _Builder, _decode

    rng = np.random.default_rng(bits)
    k = 1 << bits  # an index touches up to 4 bytes (from 18 bits)
    centroids = rng.standard_normal(k).astype(np.float32)
    indices = rng.integers(0, k, size=(5, 7, 3)).astype(np.int32)  # 105 values: not a whole block
    indices.flat[0] = k - 1
    builder = _Builder()
    _decode(builder, "w", centroids, indices)
    graph = onnx.helper.make_graph(
        builder.nodes, "decode", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, list(indices.shape))], builder.initializers,
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, tmp_path / "decode.onnx")
    (got,) = run_onnx(tmp_path / "decode.onnx", np.zeros(1, np.float32), ["w"])
    assert np.array_equal(got, centroids[indices])


def test_cli_export_writes_the_file_and_reports_the_ratio(lless16, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli.onnx"
    assert cli.main(["export", str(lless16), "-o", str(out)]) == 0
    assert out.is_file() and "x the .lless file" in capsys.readouterr().out
    assert cli.main(["export", str(lless16), "-o", str(out), "--dense", "--opset", "20", "--json"]) == 0
    assert '"dense": true' in capsys.readouterr().out


@pytest.mark.parametrize(
    "source, options, message",
    [
        ("{tmp}/missing.lless", [], "does not exist"),
        ("{tmp}/notes.txt", [], "not a .lless file"),
        ("{lless}", ["--opset", "17"], "use --dense"),
        ("{lless}", ["--opset", "99", "--dense"], "opset must be"),
    ],
)
def test_bad_input_fails_with_one_line_and_no_output(lless16, tmp_path, capsys, monkeypatch, source, options, message):
    (tmp_path / "notes.txt").write_text("not a model\n")
    out = tmp_path / "out.onnx"
    code = cli.main(["export", source.format(tmp=tmp_path, lless=lless16), "-o", str(out), *options])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))


def test_missing_onnx_package_says_how_to_install_it(lless16, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(labelless.LabellessError, match=r"pip install labelless\[onnx\]"):
        export_onnx(lless16, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_model_source_needs_an_input_shape(tiny, tmp_path):
    model = labelless.quantize(tiny, [{"layers": "*", "weights": 4}])
    with pytest.raises(labelless.LabellessError, match="example_input"):
        export_onnx(model, tmp_path / "m.onnx")
    custom = write_lless(tiny, [{"layers": "*", "weights": 4}], tmp_path / "tiny.lless")
    with pytest.raises(labelless.LabellessError, match="custom model"):
        export_onnx(custom, tmp_path / "m.onnx")


class _Unexportable(torch.nn.Module):
    def forward(self, x):  # no ONNX op computes singular values
        return x * torch.linalg.svdvals(x.flatten(2)).sum()


def test_what_torch_cannot_export_is_a_clear_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), _Unexportable())
    quantized = labelless.quantize(model, [{"layers": "*", "weights": 2}])
    with pytest.raises(labelless.LabellessError, match="cannot export this model.*--exporter dynamo"):
        export_onnx(quantized, tmp_path / "m.onnx", example_input=torch.zeros(1, 1, 4, 4), exporter="torchscript")
    assert not list(tmp_path.iterdir())


def test_dynamo_exporter_gives_the_same_compressed_graph(lless16, tmp_path):
    pytest.importorskip("onnxscript")
    report = export_onnx(lless16, tmp_path / "dynamo.onnx", exporter="dynamo")
    assert report["compressed_tensors"] == 22 and report["ratio"] <= 1.25
    assert_matches(tmp_path / "dynamo.onnx", labelless.load(lless16), fashion_images(SPEC, 8))


def test_height_and_width_are_dynamic_where_the_network_allows_it(lless16, tmp_path):
    report = export_onnx(lless16, tmp_path / "r18.onnx")
    assert report["dynamic_size"] and report["input_shape"] == ["batch", 1, "height", "width"]
    model = labelless.load(lless16)
    for size in (24, 64):  # the spec says 32 px
        assert_matches(tmp_path / "r18.onnx", model, torch.randn(3, 1, size, size).numpy())


def test_a_network_that_fixes_its_size_is_exported_at_that_size_or_the_one_asked_for(tiny, tmp_path):
    quantized = labelless.quantize(tiny, [{"layers": "*", "weights": 4}])  # AdaptiveAvgPool2d(4): fixed kernels
    report = export_onnx(quantized, tmp_path / "t.onnx", example_input=torch.zeros(1, 1, 8, 8))
    assert not report["dynamic_size"] and report["input_shape"] == ["batch", 1, 8, 8]
    assert_matches(tmp_path / "t.onnx", quantized, torch.randn(2, 1, 8, 8).numpy())
    report = export_onnx(quantized, tmp_path / "t16.onnx", example_input=torch.zeros(1, 1, 8, 8), input_size=16)
    assert report["input_shape"][2:] in (["height", "width"], [16, 16])
    assert_matches(tmp_path / "t16.onnx", quantized, torch.randn(2, 1, 16, 16).numpy())
    with pytest.raises(labelless.LabellessError, match="input size must be a whole number"):
        export_onnx(quantized, tmp_path / "x.onnx", example_input=torch.zeros(1, 1, 8, 8), input_size=0)


@pytest.mark.parametrize("size_in, size_out", [((1, 1), (7, 7)), ((3, 5), (6, 6)), ((13, 13), (6, 6)), ((2, 2), (7, 3))])
def test_adaptive_pooling_torch_cannot_export_is_replaced_by_the_same_averages(size_in, size_out):
    from labelless.export import _exportable_pooling

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.AdaptiveAvgPool2d(size_out))
    x = torch.randn(2, 1, *size_in)
    with torch.no_grad():
        expected = model(x)
        replaced = _exportable_pooling(copy.deepcopy(model), x)
        assert not isinstance(replaced[1], torch.nn.AdaptiveAvgPool2d)
        assert torch.allclose(replaced(x), expected, atol=1e-6)
    kept = _exportable_pooling(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(size_out)), torch.randn(1, 1, 14, 21))
    assert isinstance(kept[0], torch.nn.AdaptiveAvgPool2d) == (14 % size_out[0] == 0 and 21 % size_out[1] == 0)

"""Per-channel codebooks: at most k values per output channel (group), exact sizes in the
file, the sizer and inspect, a bit-exact reload, an equal ONNX graph, and the plan fields."""

from __future__ import annotations

import json

import pytest
import torch

import labelless
from labelless.errors import FileFormatError, PlanError
from labelless.plan import TensorChoice
from labelless.quantize import group_of_channel
from labelless.sizing import FileSizer

PER_CHANNEL = [{"layers": "*", "weights": 4, "granularity": "per_channel", "bias": 1},
               {"layers": "type:Linear", "group_size": 3}]


def choices(model, plan) -> dict[str, TensorChoice]:
    """What the plan asks of each tensor (the sizer's input), with the k each file holds."""
    settings = labelless.Plan.from_data(plan).resolve(labelless.list_layers(model))
    found = {}
    for key, qt in labelless.quantized_tensors(model).items():
        setting = settings[key.rpartition(".")[0]]
        if key.endswith(".weight"):
            found[key] = TensorChoice(qt.n_clusters, setting.granularity, setting.group_size)
        else:
            found[key] = TensorChoice(qt.n_clusters)
    return found


def test_every_channel_group_has_at_most_k_values(tiny):
    q = labelless.quantize(tiny, PER_CHANNEL)
    qt = labelless.quantized_tensors(q)
    assert qt["conv.weight"].centroids.shape == (8, 4)  # one codebook per output channel
    assert qt["fc1.weight"].centroids.shape == (22, 4)  # ceil(64 / 3) groups
    groups = group_of_channel(64, 22)
    for g in range(22):
        assert q.fc1.weight[groups == g].unique().numel() <= 4
    for c in range(8):
        assert q.conv.weight[c].unique().numel() <= 4
    assert q.conv.weight.unique().numel() > 4  # the channels really have codebooks of their own


def test_per_channel_codebooks_fit_better_than_one(tiny):
    def error(plan):
        q = labelless.quantize(tiny, plan)
        return float(((q.fc1.weight - tiny.fc1.weight) ** 2).sum().detach())

    assert error([{"layers": "fc1", "weights": 4, "granularity": "per_channel"}]) < \
        error([{"layers": "fc1", "weights": 4}])


@pytest.mark.parametrize("entropy", ["none", "ans"])
def test_reload_is_bit_exact(tmp_path, tiny, entropy):
    q = labelless.quantize(tiny, PER_CHANNEL)
    labelless.save(q, tmp_path / "m.lless", entropy=entropy)
    back = labelless.load(tmp_path / "m.lless", model=type(tiny)().eval())
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(q(x), back(x))
    for key, qt in labelless.quantized_tensors(back).items():
        assert torch.equal(qt.centroids, labelless.quantized_tensors(q)[key].centroids)


def test_sizer_and_inspect_count_every_codebook_byte(tmp_path, tiny):
    q = labelless.quantize(tiny, PER_CHANNEL)
    report = labelless.save(q, tmp_path / "m.lless")
    assert FileSizer(tiny).size(choices(q, PER_CHANNEL), labelless.Plan.from_data(PER_CHANNEL).to_data()) \
        == report["total_bytes"] == (tmp_path / "m.lless").stat().st_size
    fc1 = next(row for row in report["layers"] if row["name"] == "fc1")
    assert fc1["bytes"] == 22 * 4 * 4 + 64 * 128 * 2 // 8 + 4  # codebooks + 2-bit indices + 1-centroid bias


def test_sizer_matches_ans_coded_packed_size(tmp_path, tiny):
    q = labelless.quantize(tiny, PER_CHANNEL)
    report = labelless.save(q, tmp_path / "m.lless", entropy="ans")
    fc1 = next(row for row in report["layers"] if row["name"] == "fc1")
    assert fc1["packed_bytes"] == 22 * 4 * 4 + 64 * 128 * 2 // 8 + 4


def test_file_without_per_channel_codebooks_stays_version_1(tmp_path, tiny):
    labelless.save(labelless.quantize(tiny, [{"layers": "*", "weights": 4}]), tmp_path / "a.lless")
    labelless.save(labelless.quantize(tiny, PER_CHANNEL), tmp_path / "b.lless")
    assert labelless.read(tmp_path / "a.lless").header["version"] == 1
    assert labelless.read(tmp_path / "b.lless").header["version"] == 2


def test_lying_codebook_count_is_rejected(tmp_path, tiny):
    import safetensors.torch

    labelless.save(labelless.quantize(tiny, PER_CHANNEL), tmp_path / "m.lless")
    tensors = safetensors.torch.load_file(str(tmp_path / "m.lless"))
    with open(tmp_path / "m.lless", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(json.loads(f.read(n))["__metadata__"]["labelless"])
    header["tensors"]["conv.weight"]["codebooks"] = 9  # more codebooks than the 8 channels
    safetensors.torch.save_file(tensors, str(tmp_path / "bad.lless"), metadata={"labelless": json.dumps(header)})
    with pytest.raises(FileFormatError, match="bad number of codebooks"):
        labelless.read(tmp_path / "bad.lless")


def test_onnx_export_stays_compressed_and_equal(tmp_path, tiny):
    ort = pytest.importorskip("onnxruntime")
    from labelless.export import export_onnx

    q = labelless.quantize(tiny, PER_CHANNEL)
    info = export_onnx(q, tmp_path / "m.onnx", example_input=torch.randn(1, 1, 16, 16))
    assert info["kept_dense_tensors"] == 0 and info["compressed_tensors"] == len(labelless.quantized_tensors(q))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    x = torch.randn(2, 1, 16, 16)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), q(x), atol=1e-5)


@pytest.mark.parametrize("rule, message", [
    ({"layers": "*", "weights": 4, "granularity": "per_row"}, "'granularity' must be one of"),
    ({"layers": "*", "weights": 4, "group_size": 0}, "'group_size' must be a whole number"),
    ({"layers": "*", "weights": 4, "importance": "yes"}, "'importance' must be true or false"),
])
def test_bad_plan_fields_are_clear_errors(rule, message):
    with pytest.raises(PlanError, match=message):
        labelless.Plan.from_data([rule])


def test_plan_fields_round_trip_and_apply_to_weights_only(tiny):
    plan = labelless.Plan.from_data(PER_CHANNEL)
    assert labelless.Plan.from_data(plan.to_data()) == plan
    setting = plan.resolve(labelless.list_layers(tiny))["fc1"]
    assert (setting.weights, setting.bias, setting.granularity, setting.group_size) == (4, 1, "per_channel", 3)
    q = labelless.quantize(tiny, PER_CHANNEL)
    assert labelless.quantized_tensors(q)["fc1.bias"].centroids.shape == (1,)  # biases keep one codebook

"""Predicted .lless sizes equal the sizes of the files save() writes."""

from __future__ import annotations

import pytest

import labelless
from labelless.plan import Plan
from labelless.sizing import FileSizer


@pytest.mark.parametrize(
    "plan, codebook, dense",
    [
        ([{"layers": "*", "weights": 16, "bias": 1}], "float32", "float32"),
        ([{"layers": "3-7", "weights": 2}, {"layers": "21", "bias": 3}], "float16", "float32"),
        ([{"layers": "1", "weights": 256}], "float32", "float16"),
    ],
)
def test_predicted_size_is_the_real_file_size(tmp_path, model, plan, codebook, dense):
    q = labelless.quantize(model, plan)
    report = labelless.save(q, tmp_path / "m.lless", codebook_dtype=codebook, dense_dtype=dense)
    n_clusters = {key: qt.n_clusters for key, qt in labelless.quantized_tensors(q).items()}
    sizer = FileSizer(model, codebook_dtype=codebook, dense_dtype=dense)
    assert sizer.size(n_clusters, Plan.from_data(plan).to_data()) == report["total_bytes"]


def test_unquantized_size_and_fp32_baseline(tmp_path, model):
    sizer = FileSizer(model)
    report = labelless.save(model, tmp_path / "dense.lless")
    assert sizer.size({}) == report["total_bytes"]
    assert sizer.fp32_bytes == report["fp32_bytes"]

"""Sweep and search: a row per layer and k, exact sizes, resume, and a plan that keeps its budget."""

from __future__ import annotations

import json

import pytest
import torch

import labelless
from labelless import sensitivity
from labelless.data import Preprocess, open_images
from labelless.evaluate import agreement, balanced_agreement, predict
from labelless.search import make_evaluator, search
from labelless.sensitivity import SweepConfig, SweepResult, prepare_reference, sweep

CLUSTERS = (1, 2, 4, 16)


@pytest.fixture(scope="module")
def tiny():
    """TinyNet trained for a few seconds on the 8x8 digits, so its predictions mean something."""
    from conftest import TinyNet

    from labelless.train import TrainConfig, train_classifier

    torch.manual_seed(0)
    model = TinyNet()
    data = open_images("digits", labeled=True)
    train_classifier(model, data, Preprocess(channels=1, size=8, mean=(0.3,), std=(0.3,)),
                     config=TrainConfig(epochs=3, lr=1e-2, batch_size=64, augment=False))
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return open_images("digits", limit=256, seed=0).unlabeled()


@pytest.fixture(scope="module")
def preprocess():
    return Preprocess(channels=1, size=8, mean=(0.3,), std=(0.3,))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def swept(folder, tiny, digits, preprocess):
    return sweep(tiny, digits, preprocess, config=SweepConfig(clusters=CLUSTERS, batch_size=64), out_dir=folder)


def test_sweep_has_a_row_per_layer_tensor_and_k(swept, tiny):
    layers = labelless.list_layers(tiny)
    expected = {(l.name, "weight", k) for l in layers for k in CLUSTERS}
    expected |= {(l.name, "bias", k) for l in layers if l.n_bias for k in CLUSTERS}
    assert {(r.layer, r.tensor, r.k) for r in swept.rows} == expected
    for row in swept.rows:
        assert 0 <= row.agreement <= 100 and row.kl >= 0 and row.n_clusters <= row.k


def test_sweep_records_what_it_measured_for_a_later_search(folder, swept, tiny, digits, preprocess):
    from labelless.models import state_digest

    assert swept.provenance["weights_digest"] == state_digest(tiny)  # the weights it measured, unchanged after
    saved = SweepResult.from_dir(folder)
    assert saved.provenance == swept.provenance and saved.context is None
    again = prepare_reference(tiny, digits, preprocess, None, 16, torch.device("cpu"))  # other batches, same pixels
    assert again.images_digest == swept.provenance["images_digest"] == swept.context.images_digest
    other = prepare_reference(tiny, open_images("digits", limit=256, seed=1).unlabeled(), preprocess, None, 64,
                              torch.device("cpu"))
    assert other.images_digest != swept.provenance["images_digest"]


def test_sweep_sizes_are_real_file_sizes(tmp_path, swept, tiny):
    row = next(r for r in swept.rows if r.layer == "fc1" and r.tensor == "weight" and r.k == 4)
    q = labelless.quantize(tiny, [{"layers": "fc1", "weights": 4}])
    assert labelless.save(q, tmp_path / "one.lless")["total_bytes"] == row.bytes
    sizes = [r.bytes for r in swept.rows if r.layer == "fc1" and r.tensor == "weight"]
    assert sizes == sorted(sizes)


def test_sweep_measures_what_quantizing_that_layer_really_does(swept, tiny, digits, preprocess):
    row = next(r for r in swept.rows if r.layer == "conv" and r.tensor == "weight" and r.k == 2)
    teacher = predict(tiny, digits, preprocess).logits
    student = predict(labelless.quantize(tiny, [{"layers": "conv", "weights": 2}]), digits, preprocess).logits
    assert row.agreement == pytest.approx(agreement(student, teacher))
    assert row.balanced == pytest.approx(balanced_agreement(student, teacher))


def test_balanced_agreement_weighs_every_predicted_class_alike():
    teacher = torch.zeros(100, 3)
    teacher[:90, 0] = teacher[90:, 1] = 1.0  # the teacher calls 90% of the images class 0
    student = teacher.clone()
    student[90:] = torch.tensor([0.0, 0.0, 1.0])  # right on all of class 0, wrong on all of class 1
    assert agreement(student, teacher) == pytest.approx(90.0)
    assert balanced_agreement(student, teacher) == pytest.approx(50.0)  # class 2, never predicted, is left out


@pytest.mark.parametrize("budget", [1.0, 10.0])
def test_a_balanced_budget_holds_on_the_balanced_agreement_of_the_plan(swept, tiny, digits, preprocess, budget):
    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    found = search(swept, make_evaluator(reference, "balanced"), max_drop=budget, metric="balanced")
    q = labelless.quantize(tiny, found.best.plan())
    drop = 100 - balanced_agreement(predict(q, digits, preprocess).logits, predict(tiny, digits, preprocess).logits)
    assert drop == pytest.approx(found.best.measured_drop, abs=1e-6) and drop <= budget


def test_an_older_sweep_without_balanced_figures_still_searches_by_agreement_only(tmp_path, swept, tiny, digits,
                                                                                 preprocess):
    from labelless import LabellessError
    from labelless.runconfig import SearchSection

    data = swept.to_dict()
    for row in data["rows"]:
        del row["balanced"]  # as a sweep.json written before the balanced figure
    (tmp_path / "sweep.json").write_text(json.dumps(data))
    old = SweepResult.from_dir(tmp_path)
    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    assert search(old, make_evaluator(reference), max_drop=5.0).best.measured_drop <= 5.0
    with pytest.raises(LabellessError, match="run the sweep again"):
        search(old, make_evaluator(reference, "balanced"), max_drop=5.0, metric="balanced")
    assert SearchSection(metric="balanced").metric == "balanced"  # labelless run takes it


def test_a_compensated_sweep_measures_each_weight_as_compensation_ships_it(swept, tiny, digits, preprocess):
    from labelless.compensate import compensate
    from labelless.evaluate import kl_divergence

    config = SweepConfig(clusters=(2, 4), batch_size=64, include_bias=False, compensate=True)
    compensated = sweep(tiny, digits, preprocess, config=config)
    teacher = predict(tiny, digits, preprocess).logits
    for row in compensated.rows:  # every layer alone, quantized, then compensated as labelless run does it
        q = labelless.quantize(tiny, labelless.Plan.from_choice({row.key: row.choice}))
        compensate(q, tiny, digits, preprocess, n_images=len(digits), batch_size=64)
        assert row.kl == pytest.approx(kl_divergence(teacher, predict(q, digits, preprocess).logits), rel=1e-3)
    plain = {(r.key, r.k): r.kl for r in swept.rows}
    assert sum(r.kl for r in compensated.rows) < sum(plain[r.key, r.k] for r in compensated.rows)


def test_sweep_writes_table_json_and_plots(swept, folder):
    for name in ("sweep.csv", "sweep.json", "heatmap.png", "pareto.png"):
        assert (folder / name).stat().st_size > 0
    assert len((folder / "sweep.csv").read_text().splitlines()) == len(swept.rows) + 1
    assert SweepResult.from_dir(folder).rows == swept.rows
    assert "biases_at_1" in json.loads((folder / "sweep.json").read_text())["summary"]


def test_a_killed_sweep_resumes_and_reuses_finished_rows(tmp_path, folder, tiny, digits, preprocess, swept, monkeypatch):
    import shutil

    shutil.copytree(folder, tmp_path / "sweep")
    journal = tmp_path / "sweep" / "rows.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[: 1 + 2 * len(CLUSTERS)]) + '\n{"index": 3, "lay')  # killed mid-line
    calls = []
    real = sensitivity._sweep_layer
    monkeypatch.setattr(sensitivity, "_sweep_layer",
                        lambda ctx, sp, layer, jobs, *rest: calls.append(layer.name) or real(ctx, sp, layer, jobs, *rest))
    again = sweep(tiny, digits, preprocess, config=SweepConfig(clusters=CLUSTERS, batch_size=64), out_dir=tmp_path / "sweep")
    assert "conv" not in calls and len(calls) == len(labelless.list_layers(tiny)) - 1
    assert [(r.layer, r.tensor, r.k, r.bytes) for r in again.rows] == [(r.layer, r.tensor, r.k, r.bytes) for r in swept.rows]
    for a, b in zip(again.rows, swept.rows):
        assert a.agreement == pytest.approx(b.agreement) and a.kl == pytest.approx(b.kl, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("budget", [1.0, 10.0])
def test_searched_plan_meets_its_budget_when_evaluated(swept, tiny, digits, preprocess, budget):
    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    found = search(swept, make_evaluator(reference), max_drop=budget)
    assert found.best.measured_drop <= budget
    q = labelless.quantize(tiny, found.best.plan())
    drop = 100 - agreement(predict(q, digits, preprocess).logits, predict(tiny, digits, preprocess).logits)
    assert drop == pytest.approx(found.best.measured_drop, abs=1e-6) and drop <= budget
    assert found.best.bytes < swept.reference["fp32_bytes"]
    sizes = [c.bytes for c in found.alternatives]
    assert sizes == sorted(sizes) and found.best in found.alternatives


def test_a_search_measuring_plans_as_shipped_keeps_its_budget_on_the_compensated_model(swept, tiny, digits,
                                                                                        preprocess):
    from labelless.compensate import compensate

    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    built = {}

    def build(choice):  # as labelless run ships a plan: quantized, then compensated on unlabelled images
        model = labelless.quantize(tiny, labelless.Plan.from_choice(choice))
        compensate(model, tiny, digits, preprocess, n_images=128)
        built[json.dumps(labelless.Plan.from_choice(choice).to_data())] = model
        return model

    found = search(swept, make_evaluator(reference, build=build), max_drop=2.0)
    shipped = built[json.dumps(found.best.plan().to_data())]
    drop = 100 - agreement(predict(shipped, digits, preprocess).logits, predict(tiny, digits, preprocess).logits)
    assert drop == pytest.approx(found.best.measured_drop, abs=1e-6) and drop <= 2.0
    plain = make_evaluator(reference)(found.best.choice)
    assert plain[0] == found.best.bytes  # compensation moves indices, never bytes
    with pytest.raises(labelless.LabellessError, match="build must apply the plan"):
        make_evaluator(reference, build=lambda choice: tiny)(found.best.choice)


def test_search_by_size_returns_the_most_faithful_plan_that_fits(swept, tiny, digits, preprocess):
    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    limit = swept.reference["fp32_bytes"] // 3
    found = search(swept, make_evaluator(reference), max_bytes=limit)
    assert found.best.bytes <= limit
    fitting = [c for c in found.alternatives if c.bytes <= limit]
    assert found.best.measured_drop == min(c.measured_drop for c in fitting)


def test_under_a_size_budget_equal_drops_go_to_the_plan_with_the_smaller_kl(swept, tiny, digits, preprocess):
    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    real = make_evaluator(reference)

    def coarse(choice):  # every plan the same agreement drop, as on few images; KL still tells them apart
        size, _, figures = real(choice)
        return size, 1.0, dict(figures, kl=1.0 / size)

    limit = swept.reference["fp32_bytes"] // 3
    found = search(swept, coarse, max_bytes=limit)
    fitting = [c for c in found.alternatives if c.bytes <= limit]
    assert len({c.bytes for c in fitting}) >= 2, "the test needs two plans that fit"
    assert found.best.bytes == max(c.bytes for c in fitting)  # the least KL, not the fewest bytes


def test_a_size_target_as_a_fraction_of_fp32_bounds_the_file(swept, tiny, digits, preprocess, tmp_path):
    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    fp32 = swept.reference["fp32_bytes"]
    found = search(swept, make_evaluator(reference), smaller_by=0.8)
    assert found.best.bytes <= 0.2 * fp32
    q = labelless.quantize(tiny, found.best.plan())
    labelless.save(q, tmp_path / "q.lless")
    assert (tmp_path / "q.lless").stat().st_size <= 0.2 * fp32  # the file on disk, not only the estimate
    tighter = search(swept, make_evaluator(reference), smaller_by=0.5, max_bytes=int(0.2 * fp32))
    assert tighter.best.bytes <= 0.2 * fp32  # both given: the tighter one holds
    with pytest.raises(labelless.LabellessError, match="fraction in"):
        search(swept, make_evaluator(reference), smaller_by=1.5)


def test_rescoring_after_retraining_picks_by_the_retrained_drop(swept, tiny, digits, preprocess):
    from labelless.search import rescore

    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    limit = swept.reference["fp32_bytes"] // 3
    found = search(swept, make_evaluator(reference), max_bytes=limit)
    fitting = sorted((c for c in found.alternatives if c.bytes <= limit),
                     key=lambda c: (c.measured_drop, c.measured["kl"]))  # the most faithful first
    assert len(fitting) >= 2, "the test needs two plans that fit"
    worst_before = fitting[1]  # retraining helps it most: it wins after retraining
    seen = []

    def retrained(candidate):
        seen.append(candidate)
        return 0.0 if candidate is worst_before else candidate.measured_drop

    again = rescore(found, retrained, n=2)
    assert again.best is worst_before and again.best.retrained_drop == 0.0
    assert seen == fitting[:2] and all(c.bytes <= limit for c in seen)


def test_rescoring_under_a_drop_budget_returns_the_smallest_plan_that_fits_after_retraining(swept, tiny, digits,
                                                                                            preprocess):
    from labelless.search import rescore

    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    found = search(swept, make_evaluator(reference), max_drop=1.0)
    smaller = [c for c in found.alternatives if c.bytes < found.best.bytes]
    assert smaller, "the test needs a plan smaller than the answer"
    again = rescore(found, lambda c: 0.5, n=3)  # every plan fits once retrained: the smallest in the pool wins
    pool = sorted([c for c in found.alternatives if c.bytes <= found.best.bytes], key=lambda c: c.bytes)[-3:]
    assert again.best is pool[0] and again.best.bytes < found.best.bytes
    kept = rescore(found, lambda c: 5.0, n=3)  # none fits after retraining: the answer stands
    assert kept.best is found.best


def test_granularity_and_importance_are_options_the_search_can_pick(tmp_path, tiny, digits, preprocess):
    from labelless.importance import fisher_importance

    importance = fisher_importance(tiny, digits, preprocess, n_images=64)
    config = SweepConfig(clusters=(2, 4), batch_size=64, granularities=("per_tensor", "per_channel"))
    result = sweep(tiny, digits, preprocess, config=config, importance=importance)
    weights = {(r.layer, r.granularity, r.k) for r in result.rows if r.tensor == "weight"}
    assert ("fc1", "per_channel", 2) in weights and ("fc1", "per_tensor", 2) in weights
    assert all(r.granularity == "per_tensor" for r in result.rows if r.tensor == "bias")  # biases: one codebook
    reference = prepare_reference(tiny, digits, preprocess, None, 64, torch.device("cpu"))
    reference.importance = importance
    found = search(result, make_evaluator(reference), max_drop=100.0)  # the smallest plan of all
    plan = found.best.plan()
    q = labelless.quantize(tiny, plan, importance=importance)
    report = labelless.save(q, tmp_path / "m.lless")
    assert found.best.bytes == report["total_bytes"]  # what the search measured is the file
    drop = 100 - agreement(predict(q, digits, preprocess).logits, predict(tiny, digits, preprocess).logits)
    assert drop == pytest.approx(found.best.measured_drop, abs=1e-6)
    per_channel = [r for r in result.rows if r.granularity == "per_channel" and r.tensor == "weight" and r.k == 2]
    per_tensor = {(r.layer, r.k): r for r in result.rows if r.granularity == "per_tensor" and r.tensor == "weight"}
    assert all(r.bytes > per_tensor[(r.layer, 2)].bytes for r in per_channel)  # codebooks cost bytes

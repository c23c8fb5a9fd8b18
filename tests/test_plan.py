"""Plans: rules in order, field-by-field override, selectors, clear errors."""

from __future__ import annotations

import pytest

import labelless
from labelless import Plan, PlanError
from labelless.plan import LayerSetting, load_plan


def _layers(name: str, **kwargs):
    return labelless.list_layers(labelless.build_model(labelless.ModelSpec(name, **kwargs), device="meta"))


def test_later_rule_overrides_earlier_field_by_field():
    layers = _layers("vgg16")
    plan = Plan.from_data([{"layers": "*", "weights": 8, "bias": 1}, {"layers": "2", "weights": 32}])
    settings = plan.resolve(layers)
    assert settings["features.2"] == LayerSetting(weights=32, bias=1)
    assert settings["features.0"] == LayerSetting(weights=8, bias=1)


def test_unmentioned_layers_stay_full_precision():
    settings = Plan.from_data([{"layers": "1,3,5-7", "weights": 4}]).resolve(_layers("vgg16"))
    assert sorted(s.weights for s in settings.values()) == [4] * 5
    assert {name for name in settings} == {"features.0", "features.5", "features.10", "features.12", "features.14"}


def test_paper_vgg16_configuration_is_expressible_exactly():
    plan = Plan.from_data([{"layers": "*", "bias": 1}, {"layers": "14-15", "weights": 32}])
    settings = plan.resolve(_layers("vgg16"))
    weights = {name for name, s in settings.items() if s.weights is not None}
    assert weights == {"classifier.0", "classifier.3"}  # the first two fully connected layers
    assert all(s.weights == 32 for name, s in settings.items() if name in weights)
    assert len(settings) == 16 and all(s.bias == 1 for s in settings.values())


def test_paper_resnet50_configuration_is_expressible_exactly():
    layers = _layers("resnet50")
    plan = Plan.from_data([{"layers": "*", "bias": 1}, {"layers": "13-49", "weights": 256}])
    settings = plan.resolve(layers)
    quantized = [layer.index for layer in layers if settings.get(layer.name, LayerSetting()).weights == 256]
    assert quantized == list(range(13, 50))
    assert settings["fc"].bias == 1


def test_bias_setting_is_dropped_for_layers_without_bias():
    settings = Plan.uniform(weights=None, bias=1).resolve(_layers("resnet18"))
    assert list(settings) == ["fc"]


@pytest.mark.parametrize(
    "selector, expected",
    [("features.0", ["features.0"]), ("re:classifier\\.[03]", ["classifier.0", "classifier.3"]),
     ("type:Linear", ["classifier.0", "classifier.3", "classifier.6"]), ("16", ["classifier.6"])],
)
def test_selectors(selector, expected):
    settings = Plan.from_data([{"layers": selector, "weights": 2}]).resolve(_layers("vgg16"))
    assert sorted(settings) == expected


@pytest.mark.parametrize(
    "data, message",
    [
        ([{"layers": "*", "weights": 2.5}], "whole number"),
        ([{"layers": "*", "weights": 0}], "between 1"),
        ([{"layers": "*", "weights": True}], "whole number"),
        ([{"layers": "*", "wieghts": 2}], "unknown field"),
        ([{"weights": 2}], "no 'layers'"),
        ([{"layers": "*"}], "neither"),
        ([], "non-empty list"),
        ("weights: 2", "non-empty list"),
    ],
)
def test_malformed_plans_are_rejected_with_clear_errors(data, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_data(data)


@pytest.mark.parametrize(
    "selector, message",
    [("17", "out of range"), ("3-2", "backwards"), ("nothing.here", "matches no layer"), ("re:(", "bad regular")],
)
def test_selectors_that_select_nothing_are_rejected(selector, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_data([{"layers": selector, "weights": 2}]).resolve(_layers("vgg16"))


def test_plan_files_round_trip_in_yaml_and_json(tmp_path):
    plan = Plan.from_data([{"layers": "*", "bias": 1}, {"layers": "14-15", "weights": 32}, {"layers": "1", "weights": None}])
    for name in ("plan.yaml", "plan.json"):
        plan.save(tmp_path / name)
        assert load_plan(tmp_path / name) == plan


def test_malformed_plan_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text('- layers: "*\n  weights: 2\n')
    with pytest.raises(PlanError, match="bad.yaml: not valid YAML"):
        load_plan(path)
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "missing.yaml")

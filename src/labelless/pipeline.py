"""``labelless run``: the whole method end to end, from one YAML config (or the defaults).

Load or train the teacher -> sweep -> search -> quantize -> retrain label-free (and the
labelled baseline) -> evaluate -> write ``model.lless``, ``report.md``, ``report.json``, the
sweep files and plots, and the resolved config into the output folder. Every stage that
already finished with the same settings is reused when the run is started again.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import distributed, provenance
from .calibrate import calibrated_model
from .config import to_mapping
from .data import absolute_spec
from .errors import DataError
from .evaluate import accuracy, agreement, kl_divergence, predict, resolve_device
from .fileformat import save
from .importance import fisher_importance
from .io import atomic_write_json, atomic_write_text
from .models import (
    ModelSpec,
    absolute_weights,
    build_model,
    load_weights,
    normalisation_for,
    save_checkpoint,
    state_digest,
)
from .plan import Plan, load_plan
from .refine import cached_refine, refinable
from .report import plot_search, recovery
from .retrain import CrossEntropy, retrain
from .runconfig import RunConfig
from .search import make_evaluator, rescore, search
from .sensitivity import sweep
from .train import train_classifier

__all__ = ["RunConfig", "run_pipeline"]

log = logging.getLogger(__name__)

NEAR_CHANCE = 0.15  # an original this share of the way from chance to 100% or less: warn about data.test

@dataclass
class _Run:
    config: RunConfig
    out: Path
    device: torch.device
    spec: ModelSpec | None = None
    teacher: nn.Module | None = None
    test_logits: torch.Tensor | None = None  # the teacher's, to measure agreement on the test set
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    quantized: dict[str, nn.Module] = field(default_factory=dict)  # by plan: made once, also by the search


def run_pipeline(config: RunConfig) -> dict[str, Any]:
    """Run every stage and return ``report.json``'s content.

    Example:
        >>> report = run_pipeline(RunConfig(out="runs/demo"))
        >>> report["size_reduction"]
        0.88
    """
    from .data import Preprocess

    config.check()  # what it names exists, before any work: a typo fails in a second, not an hour in
    out = Path(config.out)
    if distributed.is_main():  # under torchrun, rank 0 alone writes files
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_mapping(config), sort_keys=False))
    run = _Run(config, out, resolve_device(config.device))
    torch.manual_seed(config.seed)
    _stage(run, "teacher", _teacher)
    distributed.broadcast_state(run.teacher)  # every rank goes on with rank 0's teacher
    preprocess = Preprocess.for_spec(run.spec).to(run.device)
    test = _evaluation_set(run)
    run.report["original"] = _original(run, test, preprocess)
    importance = _stage(run, "importance", lambda r: _importance(r, preprocess))
    plan = _stage(run, "sweep and search", lambda r: _plan(r, preprocess, importance))
    # under torchrun every rank goes on with rank 0's indices (rank 0 may hold the model its search made)
    quantized = _stage(run, "quantize", lambda r: distributed.broadcast_state(_quantized(r, plan, importance,
                                                                                         preprocess)))
    run.report["quantized"] = _evaluate(run, quantized, test, preprocess, "quantized.lless")
    _stage(run, "label-free retraining", lambda r: _labelfree(r, quantized, test, preprocess))
    if config.runs_baseline:
        _stage(run, "labelled retraining", lambda r: _labeled(r, quantized, test, preprocess))
    elif config.baseline:
        log.info("no labelled baseline: data.%s is null", "test" if not config.data.test else "baseline")
    return _finish(run, plan)


def _stage(run: _Run, name: str, step) -> Any:
    log.info("== %s", name)
    start = time.perf_counter()
    result = step(run)
    run.timings[name] = round(time.perf_counter() - start, 2)
    return result


def _open(spec_text: str, split: str, labeled: bool, spec: ModelSpec, limit: int | None, seed: int, after: int = 0):
    from .data import open_images

    return open_images(spec_text, split=split, labeled=labeled, size=spec.image_size, channels=spec.in_channels,
                       limit=limit, seed=seed, after=after)


# -- stages --------------------------------------------------------------------------------


def _teacher(run: _Run) -> None:
    section = run.config.model
    if section.weights:
        run.spec = section.spec(*normalisation_for(section.weights, section.mean, section.std, "model.mean/std"))
        advice = "check the config's model section (name, num_classes, in_channels, small_input)"
        run.teacher = load_weights(build_model(run.spec), section.weights, advice=advice).to(run.device).eval()
        return
    train = _open(run.config.teacher.data, "train", True, section.spec(), run.config.teacher.limit, run.config.seed)
    mean, std = _channel_stats(train.images)
    run.spec = section.spec(section.mean or mean, section.std or std)
    run.teacher = _cached_teacher(run, train)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images[:10000].float() / 255
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


def _cached_teacher(run: _Run, train) -> nn.Module:
    """Train the teacher, or reuse ``teacher.safetensors`` trained with the same settings."""
    from .data import Preprocess

    path, meta = run.out / "teacher.safetensors", run.out / "teacher.json"
    identity = {"spec": run.spec.to_dict(), "teacher": to_mapping(run.config.teacher), "seed": run.config.seed}
    model = build_model(run.spec).to(run.device)
    saved = json.loads(meta.read_text()) if path.is_file() and meta.is_file() else {}
    if saved.get("identity") == identity:
        log.info("reusing the teacher trained earlier in %s", path)
        run.report["teacher_training"] = saved.get("training")  # as the run that trained it reported
        return load_weights(model, path).eval()
    stats = train_classifier(model, train, Preprocess.for_spec(run.spec).to(run.device),
                             config=run.config.teacher.train, device=run.device)
    if distributed.is_main():
        save_checkpoint(model, path, run.spec)
        atomic_write_json(meta, {"identity": identity, "training": stats})
    run.report["teacher_training"] = stats
    return model.eval()


def _evaluation_set(run: _Run):
    """The labelled test set; or, with ``data.test`` null, unlabelled images of ``data.unlabeled``
    that no other stage sees (drawn after all of theirs), so that no label is read anywhere."""
    data, seed = run.config.data, run.config.seed
    if data.test:
        return _open(data.test, "test", True, run.spec, data.test_limit, seed)
    after = _unlabeled_used(run.config)
    try:
        images = _open(data.unlabeled, "train", False, run.spec, data.test_limit, seed, after=after)
    except DataError as exc:
        raise DataError(f"data.test is null, so models are scored on unlabelled images no other stage uses "
                        f"(after the first {after}): {exc}") from None
    log.info("no labelled test set (data.test: null): every model is scored label-free, by agreement and KL "
             "with the original on %d images of %s held apart from every other stage", len(images), data.unlabeled)
    return images.unlabeled()


def _unlabeled_used(config: RunConfig) -> int:
    """How many images of the seeded draw of ``data.unlabeled`` the stages before evaluation use."""
    used = [config.data.unlabeled_limit or 0, config.sweep.limit]
    if config.sweep.importance:
        used.append(config.sweep.importance_images)
    if config.quantize.compensate or config.quantize.correct_bn:
        used.append(config.quantize.images)
    if config.search.after_retraining and not config.search.plan:
        used.append(config.sweep.limit + config.search.retrain_images)
    return max(used)


def _original(run: _Run, test, preprocess) -> dict[str, Any]:
    from .fileformat import fp32_safetensors_bytes

    logits, labels = predict(run.teacher, test, preprocess, device=run.device, desc="evaluate original")
    run.test_logits = logits
    figures = dict(_scores(run, logits, labels), bytes=fp32_safetensors_bytes(run.teacher), images=len(logits))
    _warn_if_chance(run, figures["accuracy"])
    return figures


def _scores(run: _Run, logits: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
    """Accuracy (None without labels), and agreement and KL with the original on the same images."""
    return {"accuracy": accuracy(logits, labels) if labels is not None else None,
            "agreement": agreement(logits, run.test_logits), "kl": kl_divergence(run.test_logits, logits)}


def _warn_if_chance(run: _Run, score: float | None) -> None:
    """One warning when the original model is barely above chance on ``data.test``: most likely a
    test set of another task (the default, Fashion-MNIST, left in a config for digits)."""
    chance = 100.0 / run.spec.num_classes
    if score is not None and score < chance + NEAR_CHANCE * (100.0 - chance):
        log.warning("the original model scores %.2f%% on data.test %s (chance is %.2f%%): is it the model's own "
                    "task? set data.test to its test set, or null to score label-free", score, run.config.data.test,
                    chance)


def _importance(run: _Run, preprocess) -> dict[str, torch.Tensor] | None:
    """Fisher importance of every weight on the unlabelled images (no label read), or None."""
    cfg = run.config.sweep
    if not cfg.importance:
        return None
    data = run.config.data
    images = _open(data.unlabeled, "train", False, run.spec, cfg.importance_images, run.config.seed)
    return fisher_importance(run.teacher, images.unlabeled(), preprocess, n_images=cfg.importance_images,
                             seed=run.config.seed, device=run.device)


def _quantized(run: _Run, plan, importance, preprocess) -> nn.Module:
    """The plan applied; then, as configured, compensated and BatchNorm-corrected on the unlabelled
    images (once per plan in a run: a plan the search already made is handed back)."""
    key = _plan_key(plan)
    if key not in run.quantized:
        run.quantized[key] = _quantize(run, plan, importance, preprocess)
    return run.quantized[key]


def _plan_key(plan) -> str:
    return json.dumps(plan.to_data(), sort_keys=True)


def _quantize(run: _Run, plan, importance, preprocess) -> nn.Module:
    cfg = run.config.quantize
    images = None
    if cfg.compensate or cfg.correct_bn:
        images = _open(run.config.data.unlabeled, "train", False, run.spec, cfg.images, run.config.seed).unlabeled()
    return calibrated_model(run.teacher, plan, images, preprocess, importance=importance, compensate=cfg.compensate,
                            correct_bn=cfg.correct_bn, n_images=cfg.images, seed=run.config.seed, device=run.device)


def _plan(run: _Run, preprocess, importance):
    section = run.config.search
    if section.plan:
        return load_plan(section.plan)
    cfg, data = run.config.sweep, run.config.data
    unlabeled = _open(data.unlabeled, "train", False, run.spec, cfg.limit, run.config.seed)
    sweep_config = cfg.config()
    identity = {"spec": run.spec.to_dict(), "data": data.unlabeled, "limit": cfg.limit, "seed": run.config.seed,
                "teacher": state_digest(run.teacher)[:16],
                "importance": cfg.importance_images if importance is not None else None}
    result = sweep(run.teacher, unlabeled, preprocess, config=sweep_config, out_dir=run.out / "sweep",
                   identity=identity, device=run.device, importance=importance, data=_sweep_data(run))
    identity = dict(identity, sweep=to_mapping(cfg), search=to_mapping(run.config.search),
                    quantize=to_mapping(run.config.quantize), retrain=to_mapping(run.config.retrain))
    return distributed.on_main(lambda: _cached_search(run, identity) or _search(run, result, preprocess,
                                                                              importance, identity))  # the others wait


def _sweep_data(run: _Run) -> dict[str, Any]:
    """Where the sweep's images come from (its provenance): ``labelless search runs/x/sweep``
    measures other budgets on the same teacher and images."""
    cfg = run.config
    weights = absolute_weights(cfg.model.weights or str(run.out / "teacher.safetensors"))
    return provenance.data_record(weights=weights, unlabeled=absolute_spec(cfg.data.unlabeled), labeled=None,
                                  limit=cfg.sweep.limit, seed=cfg.seed, skip_unreadable=False,
                                  batch_size=cfg.sweep.batch_size, by="labelless run")


def _cached_search(run: _Run, identity: dict[str, Any]):
    """The plan ``plan.yaml`` holds when ``search.json`` was written by a search of these very
    settings (the same teacher, sweep, budgets, quantization and retraining), else None."""
    plan_file, found_file = run.out / "plan.yaml", run.out / "search.json"
    if not (plan_file.is_file() and found_file.is_file()):
        return None
    try:
        saved = json.loads(found_file.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("identity") != json.loads(json.dumps(identity)) or "summary" not in saved:
        return None
    log.info("reusing the plan searched earlier with the same settings (%s)", plan_file)
    run.report["search"] = saved["summary"]
    return load_plan(plan_file)


def _search(run: _Run, result, preprocess, importance, identity: dict[str, Any]):
    """Measure plans on the sweep's images (rank 0 alone) and write plan.yaml and search.json."""
    section, reference = run.config.search, result.context  # the sweep's images and the teacher's outputs on them
    found = search(result, make_evaluator(reference, section.metric, _builder(run, importance, preprocess)),
                   max_drop=section.max_drop, metric=section.metric, max_bytes=section.max_bytes,
                   smaller_by=section.smaller_by)
    drop = _after_retraining(run, reference, preprocess, importance) if section.after_retraining else None
    if drop is not None:
        found = rescore(found, drop, n=section.after_retraining)
    plan = found.best.plan()
    chosen = _plan_key(plan)
    run.quantized = {key: model for key, model in run.quantized.items() if key == chosen}  # the others are done
    run.report["search"] = {"max_drop": section.max_drop, "max_bytes": section.max_bytes,
                            "smaller_by": section.smaller_by, "metric": section.metric,
                            "measured_drop": found.best.measured_drop, "predicted_drop": found.best.predicted_drop,
                            "retrained_drop": found.best.retrained_drop, "after_retraining": section.after_retraining,
                            "alternatives": len(found.alternatives)}
    plan.save(run.out / "plan.yaml", header=_plan_header(found))
    plot_search(found, result.reference["fp32_bytes"], run.out / "search.png")
    atomic_write_json(run.out / "search.json", dict(found.to_dict(), identity=identity, summary=run.report["search"]))
    return plan


def _builder(run: _Run, importance, preprocess):
    """``build(choice)``: that plan's model as the run ships it, for the search to measure; None
    when the search measures plain quantized tensors (``search.as_shipped`` off, or nothing to
    calibrate: then both are the same model)."""
    cfg = run.config.quantize
    if not run.config.search.as_shipped or not (cfg.compensate or cfg.correct_bn):
        return None
    return lambda choice: _quantized(run, Plan.from_choice(choice), importance, preprocess)


def _after_retraining(run: _Run, reference, preprocess, importance):
    """``drop(candidate)``: its plan quantized as the run quantizes, retrained briefly label-free on
    images held apart from the sweep's, then its drop (in ``search.metric``) on the sweep's images
    (as read: scored on them refined instead, the demo's search picked the plan that retrained
    0.14 points worse, docs/SWEEP.md)."""
    section, data = run.config.search, run.config.data
    try:
        images = _open(data.unlabeled, "train", False, run.spec, section.retrain_images, run.config.seed,
                       after=run.config.sweep.limit).unlabeled()
    except DataError as exc:
        log.warning("the search judges plans as quantized: no unlabelled image is left apart from the sweep's (%s)",
                    exc)
        return None
    config = dataclasses.replace(run.config.retrain, epochs=section.retrain_epochs, refine_steps=0)
    images = _refined(run, images, preprocess)  # once, for every candidate

    def drop(candidate) -> float:
        model = copy.deepcopy(_quantized(run, candidate.plan(), importance, preprocess))
        result = retrain(model, run.teacher, images, preprocess, config=config, device=run.device)
        return 100.0 - reference.figures_of(result.model)[section.metric]

    return drop


def _refined(run: _Run, images, preprocess):
    """``images`` refined toward the teacher as ``retrain.refine_steps`` asks (kept in ``refined/``
    for the next run), or as they are when it is 0 or the teacher has no BatchNorm to refine toward."""
    steps = run.config.retrain.refine_steps
    if not steps:
        return images
    if not refinable(run.teacher):
        log.info("retrain.refine_steps: the model has no BatchNorm statistics to refine images toward, so "
                 "its retraining images are used as read")
        return images
    return cached_refine(run.teacher, images, preprocess, steps, run.out / "refined", device=run.device)


def _plan_header(found) -> str:
    best = found.best
    after = "" if best.retrained_drop is None else f", {best.retrained_drop:.2f} after a short label-free retraining"
    budget = ", ".join(text for text in (f"{found.max_drop} points" if found.max_drop is not None else "",
                                         f"{found.max_bytes} bytes" if found.max_bytes is not None else "") if text)
    return (f"found by labelless search: {best.bytes} bytes, measured {found.metric} drop "
            f"{best.measured_drop:.2f} points{after} (budget {budget}), predicted {best.predicted_drop:.2f}")


def _evaluate(run: _Run, model: nn.Module, test, preprocess, filename: str) -> dict[str, Any]:
    if not distributed.is_main():  # rank 0 alone measures and writes
        return {}
    storage = run.config.storage
    report = save(model, run.out / filename, entropy=storage.entropy,
                  codebook_dtype="float16" if storage.fp16_codebooks else "float32",
                  dense_dtype="float16" if storage.fp16_dense else "float32")
    logits, labels = predict(model, test, preprocess, device=run.device, desc=f"evaluate {filename}")
    return dict(_scores(run, logits, labels), bytes=report["total_bytes"], file=filename)


def _labelfree(run: _Run, quantized: nn.Module, test, preprocess) -> None:
    def train(student: nn.Module):
        data = run.config.data
        unlabeled = _open(data.unlabeled, "train", False, run.spec, data.unlabeled_limit, run.config.seed)
        config = dataclasses.replace(run.config.retrain, refine_steps=0)
        return retrain(student, run.teacher, _refined(run, unlabeled.unlabeled(), preprocess), preprocess,
                       config=config, checkpoint_dir=run.out / "checkpoints", device=run.device)

    run.report["retrained_labelfree"] = _retrained(run, quantized, test, preprocess, "model.lless", train,
                                                   holdout=True)


def _labeled(run: _Run, quantized: nn.Module, test, preprocess) -> None:
    def train(student: nn.Module):
        data = run.config.data
        labeled = _open(data.baseline, "train", True, run.spec, data.baseline_limit, run.config.seed)
        return retrain(student, CrossEntropy(), labeled, preprocess, config=run.config.retrain,
                       checkpoint_dir=run.out / "checkpoints", device=run.device)

    run.report["retrained_labeled"] = _retrained(run, quantized, test, preprocess, "baseline.lless", train)


def _retrained(run: _Run, quantized: nn.Module, test, preprocess, filename: str, train, holdout: bool = False
               ) -> dict[str, Any]:
    """Retrain a copy of ``quantized`` with ``train`` (unless nothing is left to train), write it
    as ``filename`` and return its figures; ``holdout`` adds the held-out scores."""
    result = train(copy.deepcopy(quantized))
    figures = _evaluate(run, result.model, test, preprocess, filename)
    if result.skipped:
        return dict(figures, seconds=0.0, images_per_second=0.0, best_epoch=0, skipped=result.skipped)
    if holdout:
        figures.update(holdout_before=result.before, holdout_after=result.after)
    return dict(figures, seconds=round(result.seconds, 2), images_per_second=round(result.images_per_second, 1),
                best_epoch=result.best_epoch)


def _finish(run: _Run, plan) -> dict[str, Any]:
    from .report import run_markdown

    if not distributed.is_main():
        return distributed.broadcast_object(None)  # rank 0's report
    config = run.config
    report = run.report
    final = report.get("retrained_labelfree", report["quantized"])
    report.update(
        size_reduction=1 - final["bytes"] / report["original"]["bytes"],
        plan=plan.to_data(),
        unlabeled_data=config.data.unlabeled,
        labeled_data=config.data.test,  # None: no label was read, the figures are label-free
        evaluation={"data": config.data.test or config.data.unlabeled, "split": "test" if config.data.test else "train",
                    "images": report["original"]["images"], "labeled": bool(config.data.test)},
        model=run.spec.to_dict(),
        device=str(run.device),
        timings=run.timings,
        recovery=recovery(report),  # the points quantization cost and label-free retraining won back
    )
    atomic_write_json(run.out / "report.json", report)
    atomic_write_text(run.out / "report.md", run_markdown(report))
    return distributed.broadcast_object(report)

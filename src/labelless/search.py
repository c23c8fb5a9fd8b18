"""Automatic plan search from a sweep: the smallest file whose measured drop fits a budget.

Per-layer errors add up, so the sweep's single-tensor rows only *predict* what a combined
plan does. The search

1. traces the size/error trade-off with a Lagrangian: for a multiplier ``lam`` every tensor
   independently takes the k minimising ``bytes + lam * KL`` (KL from its sweep row), which
   gives a ladder of plans from "everything at the smallest k" to "nothing quantized";
2. walks that ladder by bisection, *measuring* each plan it visits on the sweep's images
   (top-1 agreement with the original model, that agreement averaged over the classes the
   original predicts, or accuracy when labels were given: :data:`METRICS`);
3. returns the smallest plan whose measured drop is within the budget, with every measured
   plan as a Pareto list of alternatives (size, predicted drop, measured drop);
4. on request (:func:`rescore`), judges the few plans nearest the answer again by their drop
   *after* a short label-free retraining, since the retrained model is what a user ships.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .config import Choice
from .errors import LabellessError
from .plan import Plan, TensorChoice
from .quantize import quantized_tensors
from .sensitivity import Reference, SweepResult, SweepRow, scores_of, variant

__all__ = ["Metric", "LabelFreeMetric", "Candidate", "SearchResult", "search", "rescore", "ladder", "make_evaluator",
           "size_budget"]

log = logging.getLogger(__name__)

class Metric(Choice):
    """What a drop is measured in: points of top-1 agreement with the original, of that agreement
    averaged over the classes the original predicts (collapse-aware), or of labelled accuracy."""

    AGREEMENT = "agreement"
    BALANCED = "balanced"
    ACCURACY = "accuracy"


# the metrics that read no label: those labelless run's search may use
LabelFreeMetric = Choice("LabelFreeMetric", {m.name: m.value for m in Metric if m is not Metric.ACCURACY},
                         module=__name__)


LABEL_FREE_METRICS = tuple(LabelFreeMetric)
METRICS = tuple(Metric)

N_MULTIPLIERS = 400


@dataclass
class Candidate:
    """One plan on the ladder and, once evaluated, what it really does."""

    choice: dict[str, TensorChoice]  # tensor key ("features.0.weight") -> k and granularity
    predicted_bytes: int
    predicted_drop: float  # sum of the single-tensor drops, in points
    predicted_kl: float
    bytes: int | None = None  # the real .lless size, once measured
    measured_drop: float | None = None  # points below the original, once measured
    measured: dict[str, float] | None = None
    retrained_drop: float | None = None  # points below the original after a short label-free retraining

    def plan(self) -> Plan:
        return Plan.from_choice(self.choice)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["plan"] = self.plan().to_data() if self.choice else []
        del data["choice"]
        return data


@dataclass
class SearchResult:
    best: Candidate
    alternatives: list[Candidate]  # every measured plan, smallest first
    max_drop: float | None
    metric: str
    max_bytes: int | None = None  # the size budget in bytes, when there was one

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "max_drop": self.max_drop,
            "max_bytes": self.max_bytes,
            "best": self.best.to_dict(),
            "alternatives": [c.to_dict() for c in self.alternatives],
        }


def search(
    result: SweepResult,
    evaluate: Callable[[dict[str, TensorChoice]], tuple[int, float, dict[str, float]]],
    *,
    max_drop: float | None = None,
    max_bytes: int | None = None,
    metric: str = "agreement",
    smaller_by: float | None = None,
) -> SearchResult:
    """The smallest plan whose *measured* drop is at most ``max_drop`` points, or, given
    a size budget alone, the plan with the smallest measured drop that fits in that size.

    The size budget is ``max_bytes`` and/or ``smaller_by``, a fraction of the fp32 size the
    file must save (0.93: at most 7% of it); given both, the tighter one holds.

    ``evaluate(choice) -> (file bytes, measured drop in points, figures)`` quantizes the
    model by a choice and measures it (see :func:`make_evaluator`).

    Example:
        >>> found = search(sweep_result, make_evaluator(reference), max_drop=0.5)
        >>> found.best.plan().save("plan.yaml")
    """
    max_bytes = _size_budget(result, max_bytes, smaller_by)
    _check_budget(max_drop, max_bytes)
    rungs = [r for r in ladder(result, metric) if max_bytes is None or r.predicted_bytes <= max_bytes]
    measured: dict[int, Candidate] = {}
    walk = "the largest that fit" if max_drop is None else "bisection, then its neighbours"

    def measure(i: int) -> Candidate:
        if i not in measured:
            candidate = rungs[i]
            candidate.bytes, candidate.measured_drop, candidate.measured = evaluate(candidate.choice)
            log.info("measured rung %d of the %d-plan size ladder (%s): %d bytes, predicted drop %.2f, "
                     "measured %.2f points", i + 1, len(rungs), walk, candidate.bytes, candidate.predicted_drop,
                     candidate.measured_drop)
            measured[i] = candidate
        return measured[i]

    if max_drop is None:
        for i in range(max(0, len(rungs) - 4), len(rungs)):  # the largest plans that fit
            measure(i)
    else:
        best = _bisect(len(rungs), lambda i: measure(i).measured_drop <= max_drop) if rungs else None
        if best is not None:
            _measure_neighbours(best, len(rungs), measure)
    fits = [c for c in measured.values() if (max_drop is None or c.measured_drop <= max_drop)
            and (max_bytes is None or c.bytes <= max_bytes)]
    if not fits:
        raise LabellessError(_nothing_fits(metric, max_drop, max_bytes))
    chosen = min(fits, key=lambda c: c.bytes) if max_drop is not None else min(fits, key=_most_faithful)
    return SearchResult(chosen, sorted(measured.values(), key=lambda c: c.bytes), max_drop, metric, max_bytes)


def _most_faithful(candidate: Candidate) -> tuple[float, float, int]:
    """Order of preference under a size budget: the smallest measured drop; among equal drops
    (agreement on a few hundred images moves in coarse steps) the smallest KL, then bytes."""
    return candidate.measured_drop, (candidate.measured or {}).get("kl", 0.0), candidate.bytes


def rescore(found: SearchResult, retrained_drop: Callable[[Candidate], float], *, n: int = 4) -> SearchResult:
    """``found`` with its answer chosen again by each plan's drop after retraining.

    ``retrained_drop(candidate)`` retrains that plan briefly, label-free, and returns its drop
    in points on held-apart images. Under a drop budget, the ``n`` largest measured plans up to
    the answer's size are retrained and the smallest whose retrained drop fits is kept (the
    answer itself when none does); under a size budget alone, the ``n`` fitting plans with the
    smallest measured drop are, and the one with the smallest retrained drop is kept.
    """
    if n < 1:
        raise LabellessError(f"rescore needs n >= 1 plans, got {n}")
    pool = _rescore_pool(found, n)
    for candidate in pool:
        candidate.retrained_drop = float(retrained_drop(candidate))
        log.info("after retraining: %d bytes, measured drop %.2f -> %.2f points", candidate.bytes,
                 candidate.measured_drop, candidate.retrained_drop)
    if found.max_drop is None:
        best = min(pool, key=lambda c: (c.retrained_drop, c.bytes))
    else:
        fits = [c for c in pool if c.retrained_drop <= found.max_drop]
        best = min(fits, key=lambda c: c.bytes) if fits else found.best
    return dataclasses.replace(found, best=best)


def _rescore_pool(found: SearchResult, n: int) -> list[Candidate]:
    fitting = [c for c in found.alternatives if found.max_bytes is None or c.bytes <= found.max_bytes]
    if found.max_drop is None:
        return sorted(fitting, key=_most_faithful)[:n]
    smaller = [c for c in fitting if c.bytes <= found.best.bytes]  # the answer and the plans it beat
    return sorted(smaller, key=lambda c: c.bytes)[-n:]


def size_budget(fp32_bytes: int, smaller_by: float) -> int:
    """The largest file, in bytes, that is ``smaller_by`` (a fraction in [0, 1)) smaller than fp32."""
    if isinstance(smaller_by, bool) or not isinstance(smaller_by, (int, float)) or not 0 <= smaller_by < 1:
        raise LabellessError(f"smaller_by must be a fraction in [0, 1) such as 0.93 (93% smaller), got {smaller_by!r}")
    return int((1 - smaller_by) * fp32_bytes)


def _size_budget(result: SweepResult, max_bytes: int | None, smaller_by: float | None) -> int | None:
    if smaller_by is None:
        return max_bytes
    budget = size_budget(result.reference["fp32_bytes"], smaller_by)
    return budget if max_bytes is None else min(budget, max_bytes)


def _check_budget(max_drop: float | None, max_bytes: int | None) -> None:
    if max_drop is None and max_bytes is None:
        raise LabellessError("give a budget: --max-drop (points) and/or --max-bytes or --smaller-by")
    if max_drop is not None and max_drop < 0:
        raise LabellessError(f"--max-drop must be >= 0 points, got {max_drop}")
    if max_bytes is not None and max_bytes < 1:
        raise LabellessError(f"--max-bytes must be >= 1, got {max_bytes}")


def _nothing_fits(metric: str, max_drop: float | None, max_bytes: int | None) -> str:
    limits = " and ".join(
        text for text in (f"a {metric} drop within {max_drop} points" if max_drop is not None else "",
                          f"a file within {max_bytes} bytes" if max_bytes is not None else "") if text
    )
    return f"no plan gives {limits}: relax the budget or sweep more values of k"


def _bisect(n: int, ok: Callable[[int], bool]) -> int | None:
    """Smallest rung index that is ok, assuming ok is (nearly) monotone in the index."""
    if not ok(n - 1):
        return None
    low, high = 0, n - 1  # high is ok
    if ok(low):
        return low
    while high - low > 1:
        middle = (low + high) // 2
        if ok(middle):
            high = middle
        else:
            low = middle
    return high


def _measure_neighbours(best: int, n: int, measure: Callable[[int], Candidate]) -> None:
    """A few more rungs around the answer, for the list of alternatives."""
    for i in (best - 2, best - 1, best + 1, best + 3, best + 6, n - 1):
        if 0 <= i < n:
            measure(i)


def ladder(result: SweepResult, metric: str = "agreement") -> list[Candidate]:
    """Plans from smallest to largest, one per distinct Lagrangian choice."""
    options = _options(result.rows, metric, result.reference)
    if not options:
        raise LabellessError("the sweep has no rows to search")
    base = result.reference.get("unquantized_bytes", result.reference["fp32_bytes"])
    rungs: list[Candidate] = []
    seen: set[tuple] = set()
    for lam in np.concatenate([[0.0], np.logspace(-1, 16, N_MULTIPLIERS), [np.inf]]):
        choice = {key: _pick(opts, lam) for key, opts in options.items()}
        choice = {key: k for key, k in choice.items() if k is not None}
        signature = tuple(sorted(choice.items()))
        if not choice or signature in seen:
            continue
        seen.add(signature)
        rungs.append(_candidate(choice, options, base))
    rungs.sort(key=lambda c: c.predicted_bytes)
    return rungs


def _options(rows: list[SweepRow], metric: str, reference: dict) -> dict[str, list[tuple]]:
    """Per tensor: (choice, bytes saved, KL, drop) options, plus "not quantized"."""
    check_metric(rows, metric, reference)
    base = reference.get("unquantized_bytes", reference["fp32_bytes"])
    options: dict[str, list[tuple]] = {}
    for row in rows:
        drop = reference["accuracy"] - row.accuracy if metric == "accuracy" else 100.0 - getattr(row, metric)
        options.setdefault(row.key, [(None, 0, 0.0, 0.0)]).append((row.choice, base - row.bytes, row.kl, drop))
    return options


def check_metric(rows: list[SweepRow], metric: str, reference: dict) -> None:
    """One clear line when the sweep's rows cannot be searched in ``metric``."""
    if metric not in METRICS:
        raise LabellessError(f"unknown metric {metric!r}: use {', '.join(METRICS)}")
    if metric == "accuracy" and reference.get("accuracy") is None:
        raise LabellessError("--metric accuracy needs a sweep run with --eval data; use --metric agreement")
    if metric == "balanced" and any(row.balanced is None for row in rows):
        raise LabellessError("--metric balanced needs a sweep that measured it (this sweep predates the "
                             "balanced figure): run the sweep again, or use --metric agreement")


def _pick(options: list[tuple], lam: float) -> TensorChoice | None:
    if np.isinf(lam):
        return None
    return min(options, key=lambda o: (-o[1] + lam * o[2], o[2]))[0]


def _candidate(choice: dict[str, TensorChoice], options: dict[str, list[tuple]], base: int) -> Candidate:
    saved = kl = drop = 0.0
    for key, k in choice.items():
        option = next(o for o in options[key] if o[0] == k)
        saved, kl, drop = saved + option[1], kl + option[2], drop + max(0.0, option[3])
    return Candidate(choice, int(base - saved), float(drop), float(kl))


def make_evaluator(
    reference: Reference, metric: str = "agreement", build: Callable[[dict[str, TensorChoice]], nn.Module] | None = None
) -> Callable[[dict[str, TensorChoice]], tuple]:
    """``evaluate(choice) -> (file bytes, drop in points, figures)`` on the reference images.

    By default, quantized tensors are swapped into the original model in place and restored
    after, and each (tensor, choice) is clustered only once however often the search asks for
    it, under the reference's importance when it has some. ``build(choice) -> model``, when
    given, makes each plan's model as it will ship (quantized, then compensated or BatchNorm-
    corrected: see :mod:`labelless.pipeline`), and that model is measured instead.
    """
    baseline = 100.0 if metric != "accuracy" else reference.measure()["accuracy"] if reference.labeled else None
    swapped = _swapper(reference)

    def evaluate(choice: dict[str, TensorChoice | int]) -> tuple[int, float, dict[str, float]]:
        choice = {key: TensorChoice.of(k) for key, k in choice.items()}
        figures, obtained = swapped(choice) if build is None else _built(reference, build(choice), choice)
        size = reference.sizer.size(obtained, Plan.from_choice(choice).to_data() if choice else None)
        return size, baseline - figures[metric], figures

    return evaluate


def _swapper(reference: Reference) -> Callable[[dict[str, TensorChoice]], tuple[dict, dict]]:
    """``swapped(choice) -> (figures, centroids obtained per tensor)`` of the original model with
    the choice's quantized tensors swapped in (each clustered once, then cached)."""
    cache: dict[tuple[str, TensorChoice], tuple] = {}

    def swapped(choice: dict[str, TensorChoice]) -> tuple[dict, dict]:
        swaps = []
        for key, k in choice.items():
            layer, _, tensor = key.rpartition(".")
            if (key, k) not in cache:
                cache[(key, k)] = variant(reference.modules[layer], tensor, k, scores_of(reference, key))
            swaps.append((getattr(reference.modules[layer], tensor), cache[(key, k)]))
        originals = [param.detach().clone() for param, _ in swaps]
        try:
            with torch.no_grad():
                for param, (_, _, dense, _) in swaps:
                    param.copy_(dense)
            figures = reference.measure()
        finally:
            with torch.no_grad():
                for (param, _), original in zip(swaps, originals):
                    param.copy_(original)
        return figures, {key: dataclasses.replace(k, k=cache[(key, k)][3]) for key, k in choice.items()}

    return swapped


def _built(reference: Reference, model: nn.Module, choice: dict[str, TensorChoice]) -> tuple[dict, dict]:
    """(figures, centroids obtained per tensor) of a model that ``build`` made from ``choice``."""
    found = quantized_tensors(model)
    missing = sorted(set(choice) - set(found))
    if missing:
        raise LabellessError(f"the model built for a searched plan does not quantize {', '.join(missing[:3])}: "
                             f"build must apply the plan it is given")
    return reference.figures_of(model), {key: dataclasses.replace(k, k=found[key].n_clusters)
                                         for key, k in choice.items()}

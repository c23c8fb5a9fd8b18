"""Optimal 1-D k-means for weight sharing.

The clusters of sorted 1-D data are contiguous runs, so the optimum is a dynamic programme
(Wang & Song, "Ckmeans.1d.dp"). Run on millions of values it is far too slow, so:

1. the values are collapsed into sorted *points*: a small tensor into its distinct values
   (exact), a large one into fine buckets sized by the optimal-quantizer compander (bucket
   width proportional to density^(-1/3), so every future cluster spans about the same
   number of buckets wherever it lies), each bucket carrying its count and sum;
2. the weighted problem is solved exactly on those points, merged into groups of equal
   compander width when there are many more points than clusters;
3. a few Lloyd steps on the points polish the cluster boundaries;
4. every value gets the index of its point's cluster.

Measured on real layer weights the SSE stays within 0.1% of the exact optimum
(``bench/kmeans.py``, ``docs/KMEANS.md``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numba
import numpy as np
import torch

from . import _kmeans_kernels as kernels
from .errors import LabellessError

__all__ = ["kmeans1d", "sse"]

log = logging.getLogger(__name__)

EXACT_LIMIT = 1 << 16  # tensors this small are collapsed to their distinct values exactly
N_FINE = 1 << 16  # fine buckets for a large tensor
N_FINE_MIN = 1 << 11
FINE_PER_CLUSTER = 256  # fine buckets per future cluster, between N_FINE_MIN and N_FINE
DP_POINTS_PER_CLUSTER = 16  # the first exact solve runs on this many merged points a cluster
REFINE_GROUPS = 2  # the second moves each boundary within this many merged points
MIN_DP_POINTS = 1024
SPLIT_TABLE_LIMIT = 1 << 27  # entries of the programme's (clusters x points) table
POLISH_STEPS = 500
PARALLEL_MIN_VALUES = 1 << 22  # smaller tensors run on one thread (see _numba_threads)


def kmeans1d(
    values: torch.Tensor, n_clusters: int, sample_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the entries of ``values`` into at most ``n_clusters`` groups, optimally.

    Returns ``(centroids, indices)``: ``centroids`` is float32, ascending, of length
    ``min(n_clusters, number of distinct values)`` (no cluster is empty); ``indices`` is
    int64 with the shape of ``values``, so ``centroids[indices]`` is the quantized tensor.
    Works on CPU and CUDA tensors; the result is on the device of ``values``.

    Example:
        >>> w = torch.randn(64, 3, 3, 3)
        >>> centroids, indices = kmeans1d(w, 16)
        >>> centroids[indices].unique().numel() <= 16
        True
    """
    flat = _as_float32_numpy(values, "values")
    weights = None if sample_weight is None else _sample_weights(sample_weight, values)
    centroids, indices = cluster(flat, n_clusters, weights, np.int64)
    device = values.device
    return (
        torch.from_numpy(centroids).to(device),
        torch.from_numpy(indices).view(values.shape).to(device),
    )


def sse(values: torch.Tensor, centroids: torch.Tensor, indices: torch.Tensor) -> float:
    """Sum of squared errors of a clustering, in float64."""
    diff = values.double() - centroids.double()[indices.long()]
    return float((diff * diff).sum())


def cluster(
    values: np.ndarray, n_clusters: int, weights: np.ndarray | None, index_dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`kmeans1d` on a flat float32 array; indices come back as ``index_dtype``."""
    _check_n_clusters(n_clusters)
    if values.size == 0:
        raise LabellessError("cannot cluster an empty tensor: give it at least one value")
    if weights is not None and not float(weights.sum()) > 0:
        raise LabellessError("sample_weight sums to zero: give some value a positive weight")
    with _numba_threads(values.size):
        points = _collapse(values, weights, n_clusters)
        centroids, cluster_of_point = _solve(points, n_clusters)
        return centroids.astype(np.float32), points.assign(cluster_of_point, index_dtype)


@contextlib.contextmanager
def _numba_threads(n_values: int) -> Iterator[None]:
    """One numba thread below ``PARALLEL_MIN_VALUES`` values: on a busy machine every parallel
    pass waits for a second core for milliseconds, far longer than the work (measured on 2
    cores at load 7: 90 ms instead of 0.5 ms for one pass over 74k values)."""
    before = numba.get_num_threads()
    numba.set_num_threads(before if n_values >= PARALLEL_MIN_VALUES else 1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


# -- step 1: collapse the values into sorted points -------------------------------------


class _Compander:
    """How many fine buckets each float32 key is split into: proportional to the key's
    share of the integral of density^(1/3) (the optimal-quantizer compander), so a future
    cluster spans about the same number of fine buckets wherever it lies.
    """

    def __init__(self, key_counts: np.ndarray, key_lo: int):
        self.key_lo, self.n_keys = key_lo, key_counts.size
        self.occupied = np.flatnonzero(key_counts)  # the span's empty keys weigh nothing
        keys = (key_lo + self.occupied).astype(np.uint64)
        width = np.minimum(_key_start(keys + np.uint64(1)), float(np.finfo(np.float32).max))
        width -= _key_start(keys)
        self.mass = key_counts[self.occupied] ** (1 / 3) * width ** (2 / 3)

    def layout(self, n_fine: int) -> np.ndarray:
        """(keys, 2) int64: first fine bucket and number of fine buckets of each key."""
        share = np.floor(n_fine * self.mass / self.mass.sum())
        n_sub = np.zeros(self.n_keys, np.int64)
        n_sub[self.occupied] = np.clip(share, 1, 1 << kernels.KEY_SHIFT)
        offset = np.cumsum(n_sub) - n_sub
        return np.ascontiguousarray(np.stack([offset, n_sub], axis=1))


def _key_start(keys: np.ndarray) -> np.ndarray:
    """The smallest value of each key, float64 (the top key's end is +inf)."""
    ordered = (keys << np.uint64(kernels.KEY_SHIFT)).astype(np.uint32)
    bits = np.where(ordered & np.uint32(0x80000000), ordered ^ np.uint32(0x80000000), ~ordered)
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


class _Points:
    """Values collapsed to sorted points: representative value, weight, weighted sum."""

    def __init__(self, rep, weight, wsum, assign_to):
        self.rep, self.weight, self.wsum = rep, weight, wsum
        self.assign = assign_to  # (cluster of each point, index dtype) -> index of each value


def _collapse(values: np.ndarray, weights: np.ndarray | None, n_clusters: int) -> _Points:
    if values.size <= EXACT_LIMIT:
        _check_finite(int(values.size - np.isfinite(values).sum()))
        return _distinct_points(values, weights)
    bits = values.view(np.uint32)
    n_threads = numba.get_num_threads()
    key_counts, n_bad = kernels.key_histogram(bits, values, n_threads)
    _check_finite(int(n_bad))
    occupied = np.flatnonzero(key_counts)
    compander = _Compander(key_counts[occupied[0] : occupied[-1] + 1], int(occupied[0]))
    geometry = (compander.key_lo, compander.layout(_n_fine(n_clusters)))
    n_fine = int(geometry[1][-1].sum())
    stats = kernels.fine_stats(bits, values, _empty_if_none(weights), *geometry, n_fine, n_threads)
    fine = np.flatnonzero(stats[:, 0])
    if fine.size <= n_clusters:
        extrema = kernels.fine_extrema(bits, values, *geometry, n_fine)[fine]
        if np.any(extrema[:, 0] != extrema[:, 1]):
            return _distinct_points(values, weights)  # few buckets, some with several values
    count, total = stats[fine, 0], stats[fine, 1]
    weight, wsum = (count, total) if weights is None else (stats[fine, 2], stats[fine, 3])

    def assign_to(cluster_of_point: np.ndarray, index_dtype: type) -> np.ndarray:
        cluster_of_fine = np.zeros(n_fine, index_dtype)
        cluster_of_fine[fine] = cluster_of_point
        out = np.empty(values.size, index_dtype)
        kernels.assign_fine(bits, *geometry, cluster_of_fine, out)
        return out

    return _Points(total / count, weight, wsum, assign_to)


def _n_fine(n_clusters: int) -> int:
    """How many fine buckets: a fixed number per future cluster, within bounds."""
    return min(N_FINE, max(N_FINE_MIN, FINE_PER_CLUSTER * n_clusters))


def _distinct_points(values: np.ndarray, weights: np.ndarray | None) -> _Points:
    rep, inverse = np.unique(values, return_inverse=True)
    rep = rep.astype(np.float64)
    weight = np.bincount(inverse, weights=weights, minlength=rep.size).astype(np.float64)

    def assign_to(cluster_of_point: np.ndarray, index_dtype: type) -> np.ndarray:
        return cluster_of_point.astype(index_dtype)[inverse]

    return _Points(rep, weight, weight * rep, assign_to)


# -- steps 2 and 3: solve exactly on (groups of) points, then polish ----------------------


def _solve(points: _Points, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal clusters of the points: (centroids, cluster index of every point)."""
    live = points.weight > 0
    rep, weight, wsum = points.rep[live], points.weight[live], points.wsum[live]
    if weight.size <= n_clusters:
        return _polish(points, wsum / weight)
    mean = wsum.sum() / weight.sum()
    centred = wsum - weight * mean
    n_dp = _dp_size(n_clusters)
    if weight.size > n_dp and n_clusters > 1:
        starts = _coarse_then_fine(rep, weight, centred, n_clusters, n_dp)
    else:
        starts = kernels.optimal_starts(weight, centred, n_clusters)
    centroids = np.add.reduceat(centred, starts) / np.add.reduceat(weight, starts) + mean
    return _polish(points, centroids)


def _coarse_then_fine(rep: np.ndarray, weight: np.ndarray, centred: np.ndarray, n_clusters: int, n_dp: int) -> np.ndarray:
    """Solve on ``n_dp`` groups of equal compander width, then again on the points within
    ``REFINE_GROUPS`` groups of every boundary found."""
    group = np.minimum((_compander_position(rep, weight) * n_dp).astype(np.int64), n_dp - 1)
    group_starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    coarse = kernels.optimal_starts(
        np.add.reduceat(weight, group_starts), np.add.reduceat(centred, group_starts), n_clusters
    )
    last = group_starts.size - 1
    lo = group_starts[np.maximum(coarse - REFINE_GROUPS, 0)]
    hi = group_starts[np.minimum(coarse + REFINE_GROUPS, last)]
    lo, hi = np.maximum(lo, 1), np.minimum(hi, weight.size - 1)
    return kernels.refine_starts(weight, centred, lo, hi)


def _compander_position(rep: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Each point's place in [0, 1] on the density^(1/3) compander.

    The density between two neighbouring points is their mean weight over their distance,
    so a far outlier sits far from its neighbour on the map and keeps a group of its own.
    """
    mass = ((weight[1:] + weight[:-1]) / 2) ** (1 / 3) * np.diff(rep) ** (2 / 3)
    position = np.concatenate([[0.0], np.cumsum(mass)])
    return position / position[-1]


def _dp_size(n_clusters: int) -> int:
    n_dp = max(MIN_DP_POINTS, DP_POINTS_PER_CLUSTER * n_clusters)
    if n_dp * n_clusters > SPLIT_TABLE_LIMIT:
        n_dp = max(n_clusters + 1, SPLIT_TABLE_LIMIT // n_clusters)
        log.warning("k=%d is large: the exact step runs on %d merged points", n_clusters, n_dp)
    return n_dp


def _polish(points: _Points, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd steps on the points until no point changes cluster; empty clusters dropped."""
    centroids, assignment, weight = kernels.lloyd_sorted(
        points.rep, points.weight, points.wsum, centroids, POLISH_STEPS
    )
    kept = weight > 0
    if not kept.all():  # renumber the surviving clusters 0..k'-1
        assignment = np.cumsum(kept)[assignment] - 1
    return centroids[kept], assignment


# -- input checks --------------------------------------------------------------------------


def _check_n_clusters(n_clusters: object) -> None:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
        raise LabellessError(f"n_clusters must be a whole number >= 1, got {n_clusters!r}")
    if n_clusters < 1:
        raise LabellessError(f"n_clusters must be >= 1, got {n_clusters}")


def _check_finite(n_bad: int) -> None:
    if n_bad:
        raise LabellessError(
            f"the tensor holds {n_bad} NaN or infinite value(s): fix or retrain the model first"
        )


def _as_float32_numpy(tensor: torch.Tensor, name: str) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise LabellessError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise LabellessError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    return np.ascontiguousarray(tensor.detach().reshape(-1).to("cpu", torch.float32).numpy())


def _sample_weights(sample_weight: torch.Tensor, values: torch.Tensor) -> np.ndarray:
    weights = _as_float32_numpy(sample_weight, "sample_weight").astype(np.float64)
    if weights.size != values.numel():
        raise LabellessError(
            f"sample_weight has {weights.size} entries but values has {values.numel()}: "
            "give one weight per value"
        )
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise LabellessError("sample_weight must be finite and non-negative")
    return weights


def _empty_if_none(weights: np.ndarray | None) -> np.ndarray:
    return np.empty(0) if weights is None else weights

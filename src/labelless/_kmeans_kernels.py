"""Compiled kernels behind :func:`labelless.kmeans1d` (numba, cached on disk).

A value's *key* is the top 19 bits of its float32 pattern (sign, exponent, 10 mantissa
bits) mapped to an unsigned integer in value order: a key is an interval of values whose
width is about 2^-10 of their magnitude. Keys give a cheap density estimate; each key is
then split into ``n_sub`` equal *fine buckets*, many where optimal clusters will be narrow,
few where they will be wide (see ``kmeans._Compander``). Fine buckets are in value
order, which is what the exact 1-D dynamic programme needs.
"""

from __future__ import annotations

import numba as nb
import numpy as np

MANTISSA_BITS = 7
KEY_SHIFT = 23 - MANTISSA_BITS
N_KEYS = 1 << (32 - KEY_SHIFT)  # sign + 8 exponent + 7 mantissa bits


LOW_MASK = (1 << KEY_SHIFT) - 1


@nb.njit(cache=True, nogil=True, inline="always")
def _ordered(bits):
    # Map the sign-magnitude float pattern to an unsigned integer in value order.
    if bits & np.uint32(0x80000000):
        return ~bits
    return bits | np.uint32(0x80000000)


@nb.njit(cache=True, nogil=True, inline="always")
def _fine_id(bits, key_lo, layout):
    # Within a key all values share one exponent, so they are linear in the low bits:
    # split those bits into layout[b, 1] equal runs, numbered from layout[b, 0].
    ordered = _ordered(bits)
    b = np.int64(ordered >> np.uint32(KEY_SHIFT)) - key_lo
    low = np.int64(ordered & np.uint32(LOW_MASK))
    return layout[b, 0] + ((low * layout[b, 1]) >> KEY_SHIFT)


@nb.njit(cache=True, nogil=True, parallel=True)
def key_histogram(bits, values, n_threads):
    """Number of values per key, and the number of non-finite values."""
    n = values.size
    chunk = (n + n_threads - 1) // n_threads
    partial = np.zeros((n_threads, N_KEYS))
    bad = np.zeros(n_threads, np.int64)
    for t in nb.prange(n_threads):
        for p in range(t * chunk, min(n, (t + 1) * chunk)):
            if not np.isfinite(values[p]):
                bad[t] += 1
            else:
                partial[t, np.int64(_ordered(bits[p]) >> np.uint32(KEY_SHIFT))] += 1.0
    return partial.sum(axis=0), bad.sum()


@nb.njit(cache=True, nogil=True, parallel=True)
def fine_stats(bits, values, weights, key_lo, layout, n_fine, n_threads):
    """Per fine bucket: count, sum, weight, weighted sum; (n_fine, 4) float64.

    With unit weights (``weights`` empty) only count and sum are gathered; the caller
    copies them into the weight columns.
    """
    n = values.size
    chunk = (n + n_threads - 1) // n_threads
    unit = weights.size == 0
    partial = np.zeros((n_threads, n_fine, 2 if unit else 4))
    for t in nb.prange(n_threads):
        acc = partial[t]
        for p in range(t * chunk, min(n, (t + 1) * chunk)):
            f = _fine_id(bits[p], key_lo, layout)
            v = values[p]
            acc[f, 0] += 1.0
            acc[f, 1] += v
            if not unit:
                acc[f, 2] += weights[p]
                acc[f, 3] += weights[p] * v
    return partial.sum(axis=0)


@nb.njit(cache=True, nogil=True)
def fine_extrema(bits, values, key_lo, layout, n_fine):
    """Smallest and largest value in each fine bucket; (n_fine, 2)."""
    out = np.empty((n_fine, 2))
    out[:, 0] = np.inf
    out[:, 1] = -np.inf
    for p in range(values.size):
        f = _fine_id(bits[p], key_lo, layout)
        out[f, 0] = min(out[f, 0], values[p])
        out[f, 1] = max(out[f, 1], values[p])
    return out


@nb.njit(cache=True, nogil=True, parallel=True)
def assign_fine(bits, key_lo, layout, cluster_of_fine, out):
    """``out[p]`` = the cluster of the fine bucket that holds value p."""
    for p in nb.prange(bits.size):
        out[p] = cluster_of_fine[_fine_id(bits[p], key_lo, layout)]


@nb.njit(cache=True, nogil=True)
def _solve_level(prefix_w, prefix_s, prev, cur, prev_split, split, level, i_hi, stack):
    # Row minima of a monotone (Monge) matrix by divide and conquer:
    # cur[i] = min_j prev[j-1] + cost(j..i) for i in [level, i_hi]; the best j never
    # decreases with i, so each half searches only its side of the middle row's best j.
    # Nor is it below the best j with one cluster fewer (prev_split, 0 where unknown).
    # ``stack`` (rows a..b, best j within j_lo..j_hi) is a preallocated (depth, 4) array:
    # a typed list of tuples cost a third of the time.
    stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = level, i_hi, level, i_hi
    top = 1
    while top > 0:
        top -= 1
        a, b, j_lo, j_hi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        if a > b:
            continue
        i = (a + b) // 2
        best = np.inf
        j_end = min(j_hi, i)
        best_j = min(max(j_lo, prev_split[i]), j_end)  # never an empty range
        w_i, s_i = prefix_w[i + 1], prefix_s[i + 1]
        for j in range(best_j, j_end + 1):
            s = s_i - prefix_s[j]
            v = prev[j - 1] - s * s / (w_i - prefix_w[j])
            if v < best:
                best = v
                best_j = j
        cur[i] = best
        split[i] = best_j
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = a, i - 1, j_lo, best_j
        top += 1
        stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = i + 1, b, best_j, j_hi
        top += 1


@nb.njit(cache=True, nogil=True)
def optimal_starts(weights, sums, n_clusters):
    """Exact weighted 1-D k-means on sorted points (Wang & Song's dynamic programme).

    ``weights[i] > 0`` and ``sums[i]`` (weighted sum of the values in point i, centred)
    describe point i. Returns the index of the first point of each cluster, ascending.
    Minimising the SSE is minimising ``-sum over clusters of sum^2 / weight``.
    """
    n = weights.size
    k = min(n_clusters, n)
    prefix_w = np.zeros(n + 1)
    prefix_s = np.zeros(n + 1)
    for i in range(n):
        prefix_w[i + 1] = prefix_w[i] + weights[i]
        prefix_s[i + 1] = prefix_s[i] + sums[i]
    prev = np.empty(n)
    cur = np.empty(n)
    for i in range(n):
        prev[i] = -prefix_s[i + 1] * prefix_s[i + 1] / prefix_w[i + 1]
    splits = np.zeros((k, n), np.int32)  # (clusters, points)
    stack = np.empty((130, 4), np.int64)  # the search is at most log2(n) + 1 <= 64 halvings deep
    for level in range(1, k):
        _solve_level(
            prefix_w, prefix_s, prev, cur, splits[level - 1], splits[level], level, n - k + level, stack
        )
        prev, cur = cur, prev
    starts = np.zeros(k, np.int64)
    i = n - 1
    for level in range(k - 1, 0, -1):
        starts[level] = splits[level, i]
        i = starts[level] - 1
    return starts


@nb.njit(cache=True, nogil=True)
def lloyd_sorted(rep, weight, wsum, centroids, max_steps):
    """Lloyd steps on sorted weighted points with sorted centroids, until nothing moves.

    A step is one merge-like pass, O(points + clusters). Returns the centroids, each
    point's cluster and each cluster's weight (0 for a cluster that ended up empty).
    """
    n, k = rep.size, centroids.size
    centroids = centroids.copy()
    assignment = np.full(n, -1, np.int64)
    total_w = np.zeros(k)
    for _ in range(max_steps):
        changed = False
        total_w[:] = 0.0
        total_s = np.zeros(k)
        c = 0
        for i in range(n):
            while c + 1 < k and rep[i] > 0.5 * (centroids[c] + centroids[c + 1]):
                c += 1
            if assignment[i] != c:
                changed = True
                assignment[i] = c
            total_w[c] += weight[i]
            total_s[c] += wsum[i]
        for j in range(k):
            if total_w[j] > 0:
                centroids[j] = total_s[j] / total_w[j]
        if not changed:
            break
    return centroids, assignment, total_w


@nb.njit(cache=True, nogil=True)
def refine_starts(weights, sums, lo, hi):
    """Exact k-means with each cluster start ``m >= 1`` restricted to ``[lo[m], hi[m]]``.

    The windows come from a solution on merged points; solving again on the full points
    inside them moves every boundary to its best place nearby. Returns the starts, or the
    ``lo`` array unchanged if the windows admit no solution (cannot happen for windows
    around a valid solution).
    """
    n, k = weights.size, lo.size
    prefix_w = np.zeros(n + 1)
    prefix_s = np.zeros(n + 1)
    for i in range(n):
        prefix_w[i + 1] = prefix_w[i] + weights[i]
        prefix_s[i + 1] = prefix_s[i] + sums[i]
    width = np.int64(0)
    for m in range(k):
        width = max(width, hi[m] - lo[m] + 1)
    best = np.full((k, width), np.inf)
    back = np.zeros((k, width), np.int64)
    for c in range(lo[1], hi[1] + 1):  # first cluster: points 0 .. c-1
        s = prefix_s[c]
        best[1, c - lo[1]] = -s * s / prefix_w[c]
    for m in range(2, k):
        for c in range(lo[m], hi[m] + 1):
            for p in range(lo[m - 1], min(hi[m - 1], c - 1) + 1):
                s = prefix_s[c] - prefix_s[p]
                v = best[m - 1, p - lo[m - 1]] - s * s / (prefix_w[c] - prefix_w[p])
                if v < best[m, c - lo[m]]:
                    best[m, c - lo[m]] = v
                    back[m, c - lo[m]] = p
    final, arg = np.inf, -1
    for p in range(lo[k - 1], hi[k - 1] + 1):  # last cluster: points p .. n-1
        s = prefix_s[n] - prefix_s[p]
        v = best[k - 1, p - lo[k - 1]] - s * s / (prefix_w[n] - prefix_w[p])
        if v < final:
            final, arg = v, p
    starts = lo.copy()
    if arg < 0:
        return starts
    starts[0] = 0
    for m in range(k - 1, 0, -1):
        starts[m] = arg
        arg = back[m, arg - lo[m]]
    return starts

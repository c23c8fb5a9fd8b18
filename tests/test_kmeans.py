"""kmeans1d(): at most k values, SSE within 0.1% of the exact optimum, exact on few values.

The reference optimum is Wang & Song's exact dynamic programme (Ckmeans.1d.dp) through the
``ckwrap`` package, run on small seeded tensors so the whole file takes seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import labelless
from labelless import LabellessError, kmeans, kmeans1d, sse
from labelless.kmeans import EXACT_LIMIT, cluster

try:
    import ckwrap
except ImportError:  # pragma: no cover - the dev extra installs it
    ckwrap = None

needs_ckwrap = pytest.mark.skipif(ckwrap is None, reason="ckwrap (the exact reference) is not installed")

TOLERANCE = 1e-3  # our SSE may exceed the optimum by at most 0.1%
SMALL_N = 20_000  # collapsed to its distinct values (<= EXACT_LIMIT)
LARGE_N = 100_000  # collapsed to fine buckets (> EXACT_LIMIT)
DISTRIBUTIONS = ("normal", "laplace", "uniform", "student_t")


def sample(distribution: str, n: int, seed: int = 0) -> torch.Tensor:
    """n seeded float32 values of a weight-like distribution (scale ~ 0.05)."""
    rng = np.random.default_rng(seed)
    draw = {
        "normal": lambda: rng.standard_normal(n),
        "laplace": lambda: rng.laplace(size=n),
        "uniform": lambda: rng.uniform(-1.0, 1.0, n),
        "student_t": lambda: rng.standard_t(2.0, n),  # heavy tails: far outliers
    }[distribution]
    return torch.from_numpy((0.05 * draw()).astype(np.float32))


def optimal_sse(values: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> float:
    """The exact optimum (Ckmeans.1d.dp), weighted when ``weights`` is given."""
    x = values.double().flatten().numpy()
    w = None if weights is None else weights.double().flatten().numpy()
    k = min(k, np.unique(x).size)  # ckwrap refuses more clusters than distinct values
    result = ckwrap.ckmeans(x, k, weights=w)
    squared = (x - result.centers[result.labels]) ** 2
    return float(squared.sum() if w is None else (w * squared).sum())


def adjacent_floats(start: float, n: int) -> torch.Tensor:
    """``start`` and the next ``n - 1`` representable float32 values above it."""
    return torch.from_numpy(np.float32(start).view(np.int32) + np.arange(n, dtype=np.int32)).view(torch.float32)


def weighted_sse(values: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, indices: torch.Tensor) -> float:
    diff = values.double() - centroids.double()[indices]
    return float((weights.double() * diff * diff).sum())


def assert_near_optimal(ours: float, optimum: float) -> None:
    ratio = ours / optimum if optimum else float("inf")
    assert ours <= optimum * (1 + TOLERANCE) + 1e-12, f"SSE {ours:.6g} is {ratio:.5f}x the optimum {optimum:.6g}"


# -- quality: SSE against the exact optimum ----------------------------------------------


@needs_ckwrap
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("k", [2, 4, 16, 32, 256])
def test_small_tensor_sse_is_within_a_tenth_of_a_percent_of_optimal(distribution, k):
    values = sample(distribution, SMALL_N)  # more distinct values than the exact step takes
    centroids, indices = kmeans1d(values, k)
    assert_near_optimal(sse(values, centroids, indices), optimal_sse(values, k))


@needs_ckwrap
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("k", [4, 32])
def test_large_tensor_sse_is_within_a_tenth_of_a_percent_of_optimal(distribution, k):
    values = sample(distribution, LARGE_N, seed=1)
    assert values.numel() > EXACT_LIMIT  # the bucketed path
    centroids, indices = kmeans1d(values, k)
    assert_near_optimal(sse(values, centroids, indices), optimal_sse(values, k))


@needs_ckwrap
def test_large_tensor_at_256_clusters_is_within_a_tenth_of_a_percent_of_optimal():
    values = sample("laplace", EXACT_LIMIT + 4000, seed=2)  # just bucketed; keeps ckwrap near 3 s
    centroids, indices = kmeans1d(values, 256)
    assert_near_optimal(sse(values, centroids, indices), optimal_sse(values, 256))


@needs_ckwrap
def test_far_outliers_get_their_own_clusters_when_that_is_optimal():
    values = torch.cat([sample("normal", LARGE_N), torch.tensor([40.0, 41.0, -50.0])])
    centroids, indices = kmeans1d(values, 8)
    assert {40.5, -50.0} <= set(centroids.tolist())
    assert_near_optimal(sse(values, centroids, indices), optimal_sse(values, 8))


@needs_ckwrap
@pytest.mark.parametrize("n", [3_000, LARGE_N])
def test_sample_weight_equals_repeating_each_value_weight_times(n):
    values = sample("laplace", n, seed=3)
    repeats = torch.from_numpy(np.random.default_rng(3).integers(0, 4, n))  # zero weight too
    centroids, indices = kmeans1d(values, 16, sample_weight=repeats.float())
    ours = weighted_sse(values, repeats, centroids, indices)
    repeated = values.repeat_interleave(repeats)
    assert_near_optimal(ours, optimal_sse(repeated, 16))
    assert_near_optimal(ours, optimal_sse(values[repeats > 0], 16, repeats[repeats > 0]))
    c_rep, i_rep = kmeans1d(repeated, 16)
    assert ours == pytest.approx(sse(repeated, c_rep, i_rep), rel=TOLERANCE)


def test_zero_weight_values_still_get_the_nearest_centroid():
    values = torch.tensor([0.0, 0.1, 1.0, 1.1, 5.0])
    centroids, indices = kmeans1d(values, 2, sample_weight=torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(centroids, torch.tensor([0.05, 1.05]))
    assert indices.tolist() == [0, 0, 1, 1, 1]


def test_small_path_is_a_fixed_point_of_lloyd():
    # Necessary conditions of an optimum: every value sits at its nearest centroid and every
    # centroid is the mean of its values.
    values = sample("student_t", 5_000, seed=4)
    centroids, indices = kmeans1d(values, 16)
    nearest = (values[:, None] - centroids[None, :]).abs().min(dim=1).values
    assert torch.equal((values - centroids[indices]).abs(), nearest)
    means = torch.zeros(16, dtype=torch.float64).index_add_(0, indices, values.double())
    means /= torch.bincount(indices, minlength=16)
    torch.testing.assert_close(centroids, means.float())


# -- structure of the result -----------------------------------------------------------


@pytest.mark.parametrize("n", [SMALL_N, LARGE_N])
@pytest.mark.parametrize("k", [1, 3, 16, 256])
def test_quantized_tensor_has_at_most_k_values_and_no_empty_cluster(n, k):
    values = sample("normal", n, seed=k)
    centroids, indices = kmeans1d(values, k)
    assert centroids.numel() == k  # far more distinct values than clusters: all are used
    assert centroids[indices].unique().numel() <= k
    assert torch.bincount(indices.flatten(), minlength=centroids.numel()).min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_indices_are_int64_with_the_input_shape_and_centroids_ascending_float32(dtype):
    values = torch.randn(32, 16, 3, 3).to(dtype)
    centroids, indices = kmeans1d(values, 16)
    assert indices.dtype == torch.int64 and indices.shape == values.shape
    assert centroids.dtype == torch.float32 and centroids.ndim == 1
    assert bool((centroids[1:] > centroids[:-1]).all())
    assert indices.min() >= 0 and indices.max() < centroids.numel()


@pytest.mark.parametrize("n", [SMALL_N, LARGE_N])
def test_cluster_with_uint8_indices_matches_the_public_api(n):
    values = sample("laplace", n, seed=5)
    centroids, indices = kmeans1d(values, 256)
    c8, i8 = cluster(values.numpy(), 256, None, np.uint8)
    assert i8.dtype == np.uint8
    assert np.array_equal(c8, centroids.numpy()) and np.array_equal(i8, indices.numpy())


@pytest.mark.parametrize("n", [SMALL_N, LARGE_N])
def test_same_input_gives_the_same_clustering(n):
    values = sample("student_t", n, seed=6)
    first, second = kmeans1d(values, 32), kmeans1d(values.clone(), 32)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_numba_thread_count_is_left_as_it_was():
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    kmeans1d(torch.randn(LARGE_N), 4)
    assert numba.get_num_threads() == before


def test_parallel_passes_agree_with_one_thread(monkeypatch):
    values = sample("laplace", LARGE_N, seed=8)
    one_thread = kmeans1d(values, 32)
    monkeypatch.setattr(kmeans, "PARALLEL_MIN_VALUES", 0)  # as a huge tensor would run
    parallel = kmeans1d(values, 32)
    torch.testing.assert_close(parallel[0], one_thread[0], rtol=1e-6, atol=0)
    assert sse(values, *parallel) == pytest.approx(sse(values, *one_thread), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_result_is_on_the_device_of_the_input():  # pragma: no cover - CPU-only CI
    values = sample("normal", 1000).cuda()
    centroids, indices = kmeans1d(values, 4)
    assert centroids.is_cuda and indices.is_cuda
    reference = kmeans1d(values.cpu(), 4)
    assert torch.equal(centroids.cpu(), reference[0]) and torch.equal(indices.cpu(), reference[1])


# -- edge cases --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 1000, LARGE_N])
def test_one_cluster_is_the_mean(n):
    values = sample("uniform", n, seed=7) + 0.3
    centroids, indices = kmeans1d(values, 1)
    assert centroids.shape == (1,) and not indices.any()
    assert centroids.item() == pytest.approx(values.double().mean().item(), rel=1e-6)


def test_one_weighted_cluster_is_the_weighted_mean():
    values = torch.tensor([1.0, 2.0, 4.0])
    centroids, _ = kmeans1d(values, 1, sample_weight=torch.tensor([1.0, 0.0, 3.0]))
    assert centroids.tolist() == [3.25]


@pytest.mark.parametrize(
    "distinct",
    [
        torch.linspace(-1.0, 1.0, 50),  # few distinct values, small tensor
        torch.randn(200),  # few distinct values in a large tensor: one fine bucket each
        1.0 + torch.arange(120) * 2.0**-23,  # neighbouring floats
        torch.cat([adjacent_floats(1e-6, 5), torch.linspace(0.5, 1.5, 100)]),  # tiny ones share a bucket
    ],
    ids=["spread", "random", "adjacent-floats", "tiny-and-large"],
)
@pytest.mark.parametrize("n", [1000, LARGE_N])
@pytest.mark.parametrize("k_extra", [0, 7])
def test_at_least_as_many_clusters_as_values_reconstructs_exactly(distinct, n, k_extra):
    values = distinct[torch.randint(distinct.numel(), (n,))]
    n_distinct = values.unique().numel()
    centroids, indices = kmeans1d(values, n_distinct + k_extra)
    assert centroids.numel() == n_distinct  # min(k, distinct): no empty cluster
    assert torch.equal(centroids[indices], values)
    assert torch.equal(centroids, values.unique())


@pytest.mark.parametrize("n", [1, 7, LARGE_N])
@pytest.mark.parametrize("k", [1, 16])
def test_constant_tensor_gives_one_exact_centroid(n, k):
    values = torch.full((n,), -0.0123)
    centroids, indices = kmeans1d(values, k)
    assert centroids.tolist() == [values[0].item()]
    assert not indices.any() and indices.shape == values.shape


def test_signed_zeros_are_one_value():  # pruned weights: w * 0 keeps the sign of w
    values = torch.tensor([-0.0, 0.0, 0.5]).repeat(LARGE_N // 3)
    centroids, indices = kmeans1d(values, 4)
    assert centroids.tolist() == [0.0, 0.5]
    assert torch.equal(centroids[indices], values)


# -- bad input: a LabellessError (a ValueError) that says what is wrong -------------------


def test_labelless_error_is_a_value_error():
    assert issubclass(LabellessError, ValueError)
    assert labelless.LabellessError is LabellessError


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("n", [100, LARGE_N])
def test_nan_or_inf_is_rejected_with_a_clear_error(bad, n):
    values = torch.randn(n)
    values[n // 2] = bad
    with pytest.raises(LabellessError, match=r"holds 1 NaN or infinite value"):
        kmeans1d(values, 4)


@pytest.mark.parametrize("k", [0, -3])
def test_fewer_than_one_cluster_is_rejected(k):
    with pytest.raises(LabellessError, match=r"n_clusters must be >= 1"):
        kmeans1d(torch.randn(10), k)


@pytest.mark.parametrize("k", [2.0, "4", True, None])
def test_non_integer_cluster_count_is_rejected(k):
    with pytest.raises(LabellessError, match=r"n_clusters must be a whole number"):
        kmeans1d(torch.randn(10), k)


def test_numpy_integer_cluster_count_is_accepted():
    centroids, _ = kmeans1d(torch.randn(100), np.int64(4))
    assert centroids.numel() == 4


@pytest.mark.parametrize(
    "values, weights, message",
    [
        (torch.empty(0), None, r"empty tensor"),
        (np.zeros(5, np.float32), None, r"must be a torch.Tensor"),
        (torch.zeros(5, dtype=torch.complex64), None, r"real numbers"),
        (torch.randn(5), torch.ones(4), r"one weight per value"),
        (torch.randn(5), -torch.ones(5), r"finite and non-negative"),
        (torch.randn(5), torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]), r"finite and non-negative"),
        (torch.randn(5), torch.zeros(5), r"sums to zero"),
    ],
    ids=["empty", "numpy", "complex", "weight-size", "negative-weight", "nan-weight", "zero-weights"],
)
def test_bad_values_or_weights_are_rejected(values, weights, message):
    with pytest.raises(LabellessError, match=message):
        kmeans1d(values, 2, sample_weight=weights)

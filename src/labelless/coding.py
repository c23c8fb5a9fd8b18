"""Index coding for the .lless file: bit packing and optional ANS entropy coding.

Packing: index ``i`` occupies bits ``[i*b, (i+1)*b)`` of the byte stream, least significant
bit first (the layout of ``numpy.packbits(..., bitorder="little")`` on the bit planes).
ANS: ``constriction``'s stack coder with a categorical model built from the per-centroid
counts, which the file stores beside the code.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .errors import FileFormatError

__all__ = ["index_bits", "packed_size", "pack", "unpack", "ans_encode", "ans_decode"]

_CHUNK = 1 << 16  # values per parallel chunk; a multiple of 8, so chunks start on bytes
_PARALLEL_FROM = 1 << 22  # values; below this, packing runs on one thread


def index_bits(n_clusters: int) -> int:
    """Bits per index: ceil(log2 k); 0 for k = 1 (no index data at all)."""
    return max(0, math.ceil(math.log2(n_clusters))) if n_clusters > 1 else 0


def packed_size(n_values: int, bits: int) -> int:
    return (n_values * bits + 7) // 8


def pack(indices: np.ndarray, bits: int) -> np.ndarray:
    """Bit-pack non-negative integers below 2**bits into a uint8 array."""
    out = np.zeros(packed_size(indices.size, bits), np.uint8)
    if bits:
        _pack(np.ascontiguousarray(indices.reshape(-1)), bits, out)
    return out


def unpack(data: np.ndarray, bits: int, n_values: int, n_clusters: int, dtype: type) -> np.ndarray:
    """Inverse of :func:`pack`; rejects data whose size or values do not fit."""
    if not (isinstance(bits, int) and 0 <= bits <= 32 and data.dtype == np.uint8 and data.ndim == 1):
        raise FileFormatError(
            f"index data of {bits!r} bits, {data.dtype} {data.shape}, cannot be unpacked: the file is corrupt"
        )
    if data.size != packed_size(n_values, bits):
        raise FileFormatError(
            f"index data has {data.size} bytes, expected {packed_size(n_values, bits)} for "
            f"{n_values} indices of {bits} bits"
        )
    out = np.zeros(n_values, dtype)
    if bits and _unpack(data, bits, out) >= n_clusters:
        raise FileFormatError(f"an index is >= the number of centroids ({n_clusters}): the file is corrupt")
    return out


@nb.njit(cache=True, nogil=True, inline="always")
def _pack_chunk(values, bits, out, c):
    start = c * _CHUNK
    o = start * bits // 8
    acc = np.uint64(0)
    filled = 0
    for p in range(start, min(values.size, start + _CHUNK)):
        acc |= np.uint64(values[p]) << np.uint64(filled)
        filled += bits
        while filled >= 8:
            out[o] = np.uint8(acc & np.uint64(0xFF))
            o += 1
            acc >>= np.uint64(8)
            filled -= 8
    if filled > 0:
        out[o] = np.uint8(acc & np.uint64(0xFF))


@nb.njit(cache=True, nogil=True, inline="always")
def _unpack_chunk(data, bits, out, c):
    # Returns the largest index in chunk c, to check it against k.
    mask = np.uint64((1 << bits) - 1)
    start = c * _CHUNK
    i = start * bits // 8
    acc = np.uint64(0)
    filled = 0
    largest = 0
    for p in range(start, min(out.size, start + _CHUNK)):
        while filled < bits:
            acc |= np.uint64(data[i]) << np.uint64(filled)
            i += 1
            filled += 8
        value = acc & mask
        acc >>= np.uint64(bits)
        filled -= bits
        out[p] = value
        largest = max(largest, np.int64(value))
    return largest


# Chunks run in parallel for large tensors; for small ones starting threads costs more
# than the work (and much more on a busy machine), so they run serially.


@nb.njit(cache=True, nogil=True, parallel=True)
def _pack_parallel(values, bits, out):
    for c in nb.prange((values.size + _CHUNK - 1) // _CHUNK):
        _pack_chunk(values, bits, out, c)


@nb.njit(cache=True, nogil=True)
def _pack_serial(values, bits, out):
    for c in range((values.size + _CHUNK - 1) // _CHUNK):
        _pack_chunk(values, bits, out, c)


@nb.njit(cache=True, nogil=True, parallel=True)
def _unpack_parallel(data, bits, out):
    n_chunks = (out.size + _CHUNK - 1) // _CHUNK
    largest = np.zeros(n_chunks, np.int64)
    for c in nb.prange(n_chunks):
        largest[c] = _unpack_chunk(data, bits, out, c)
    return largest.max() if n_chunks else 0


@nb.njit(cache=True, nogil=True)
def _unpack_serial(data, bits, out):
    largest = 0
    for c in range((out.size + _CHUNK - 1) // _CHUNK):
        largest = max(largest, _unpack_chunk(data, bits, out, c))
    return largest


def _pack(values: np.ndarray, bits: int, out: np.ndarray) -> None:
    (_pack_parallel if values.size > _PARALLEL_FROM else _pack_serial)(values, bits, out)


def _unpack(data: np.ndarray, bits: int, out: np.ndarray) -> int:
    return (_unpack_parallel if out.size > _PARALLEL_FROM else _unpack_serial)(data, bits, out)


def _model(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def ans_encode(indices: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ANS code of ``indices`` (all below ``counts.size``) as a uint8 array."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(indices.reshape(-1), dtype=np.int32), _model(counts))
    return coder.get_compressed().view(np.uint8)


def ans_decode(data: np.ndarray, counts: np.ndarray, n_values: int, dtype: type) -> np.ndarray:
    """Inverse of :func:`ans_encode`; rejects data that is not a whole ANS stream of ``counts``."""
    import constriction

    _check_counts(counts, n_values)
    if data.dtype != np.uint8 or data.ndim != 1 or data.size % 4:
        raise FileFormatError(
            f"ANS data has {data.size} bytes, not a whole number of 32-bit words: the file is corrupt"
        )
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(data).view(np.uint32))
        decoded = coder.decode(_model(counts), n_values)
    except Exception as exc:  # constriction raises its own error types
        raise FileFormatError(f"ANS data does not decode ({type(exc).__name__}): the file is corrupt") from None
    if not coder.is_empty():
        raise FileFormatError("ANS data is longer than its indices: the file is corrupt")
    if not np.array_equal(np.bincount(decoded, minlength=counts.size), counts):
        raise FileFormatError("ANS data decodes to other centroid counts than the file stores: the file is corrupt")
    return decoded.astype(dtype, copy=False)


def _check_counts(counts: np.ndarray, n_values: int) -> None:
    """Every centroid used at least once, the counts summing to ``n_values`` (no int64 overflow)."""
    ok = counts.dtype == np.int64 and counts.ndim == 1 and counts.size > 0
    ok = ok and counts.min() > 0 and counts.max() <= n_values  # then a uint64 sum of k <= 2**24 is exact
    if not (ok and int(counts.sum(dtype=np.uint64)) == n_values):
        raise FileFormatError(f"centroid counts do not add up to the {n_values} indices: the file is corrupt")

"""The ``.lless`` file: a compressed model in one safetensors container, no pickle.

Layout (format version 2; a file without per-channel codebooks is written as version 1,
which is the same layout without the ``codebooks`` field)::

    safetensors file
      __metadata__["labelless"] = JSON header (below)
      <key>::codebook   F32|F16 (k,)      for each quantized tensor <key> (a state_dict key),
                        or (G, k)         with one codebook per group of output channels
      <key>::indices    U8 (bytes,)       bit-packed or ANS-coded indices; absent when k = 1
      <key>::counts     I64 (k,)          values per centroid; only with ANS coding
      <key>             F32|F16|...       every other state_dict tensor

    header = {
      "format": "labelless", "version": 1,
      "architecture": ModelSpec as a mapping, or null for a model given at load time,
      "plan": [rules], "layers": [{"index", "name", "type"}],
      "tensors": {<key>: {"kind": "quantized", "shape", "n_clusters", "bits", "coding",
                          "codebook_dtype", ["codebooks": G, only when G > 1]}
                        | {"kind": "dense", "shape", "dtype", "stored_dtype"}},
      "aliases": {<key>: <key it shares storage with>},
      "fp32_bytes": size of the model's fp32 state_dict saved as safetensors,
      "checksum": {"algorithm": "sha256",
                   "tensors": hex,   # over tensor names, dtypes, shapes and bytes
                   "header": hex}    # over this header without "checksum", sorted-key JSON
    }

Reading validates everything before building anything: sizes, types, limits, the checksum,
index ranges, and the architecture's shapes (built on the meta device first, so a lying
header cannot make it allocate a huge model). The checksums cover the tensors and the JSON
header; the header is also checked field by field and against the model it names; every failure is a
:class:`FileFormatError` (bench/fuzz_lless.py and tests/test_fileformat_fuzz.py attack it).

One module per step: :mod:`.writing`, :mod:`.checks` (validation), :mod:`.reading`,
:mod:`.loading` and :mod:`.inspecting`, around :mod:`labelless.layout` (names, entries, sizes,
checksums), which the sizer of :mod:`labelless.sizing` shares.
"""

from .checks import FORMAT_VERSION, READABLE_VERSIONS
from .inspecting import inspect
from .loading import DEFAULT_MAX_PARAMS, load
from .reading import LlessFile, read
from .writing import Entropy, fp32_safetensors_bytes, layer_table, save

__all__ = ["Entropy", "save", "load", "read", "inspect", "LlessFile", "FORMAT_VERSION", "READABLE_VERSIONS",
           "DEFAULT_MAX_PARAMS", "fp32_safetensors_bytes", "layer_table"]

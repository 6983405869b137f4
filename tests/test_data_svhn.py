"""SVHN format 1 (stn_jax.data.svhn) and the mnist_sequences generator.

The reader is checked on a format-1 file this test builds with h5py as MATLAB v7.3 writes it
(object references, inline one-digit boxes, referenced multi-digit boxes, a 6-digit number), and
on the real sample beside the project when it is there.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from stn_jax.data import mnist_sequences
from stn_jax.data import svhn

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "svhn_format1_sample"
needs_sample = pytest.mark.skipif(
    not SAMPLE.is_dir(), reason=f"the real SVHN format-1 sample is not at {SAMPLE} (CI only)")


def _sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


# ------------------------------------------------------------------- a faithful format-1 file


def write_digit_struct(path, entries):
    """Writes entries [(name, [(label, left, top, width, height), ...])] as MATLAB v7.3 does:
    a 512-byte user block, /#refs# holding the referenced data, /digitStruct/name and /bbox
    (N, 1) object references; one-digit boxes inline (1, 1), longer ones (k, 1) references to
    (1, 1) float64 datasets; names (n, 1) uint16 character codes."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        counter = iter(range(10**6))

        def new(data, dtype=None):
            return refs.create_dataset(f"r{next(counter)}", data=data, dtype=dtype).ref

        names, boxes = [], []
        for name, digits in entries:
            names.append(new(np.array([[ord(c)] for c in name], np.uint16)))
            group = refs.create_group(f"g{next(counter)}")
            for field_index, field in enumerate(("label", "left", "top", "width", "height")):
                values = [float(d[field_index]) for d in digits]
                if len(values) == 1:
                    group.create_dataset(field, data=np.array([[values[0]]]))
                else:
                    column = np.array([[new(np.array([[v]]))] for v in values],
                                      dtype=h5py.ref_dtype)
                    group.create_dataset(field, data=column, dtype=h5py.ref_dtype)
            boxes.append(group.ref)
        ds = f.create_group("digitStruct")
        ds.create_dataset("name", data=np.array([[r] for r in names], dtype=h5py.ref_dtype))
        ds.create_dataset("bbox", data=np.array([[r] for r in boxes], dtype=h5py.ref_dtype))
    with open(path, "r+b") as fh:  # The MATLAB header text in the user block.
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan 1 00:00:00 2012 "
                 b"HDF5 schema 1.00 .")


ENTRIES = [
    ("1.png", [(10, 2, 3, 4, 5)]),  # one digit "0" (label 10), inline
    ("2.png", [(2, 4, 2, 3, 6), (1, 8, 3, 2, 6), (10, 11, 2, 3, 7)]),  # "210", referenced
    ("3.png", [(d, 1 + 3 * i, 1, 2, 5) for i, d in enumerate((1, 2, 3, 4, 5, 6))]),  # 6 digits
    ("4.png", [(7, 15, 4, 3, 5), (3, 18, 4, 4, 5)]),  # "73", box past the right edge (width 20)
]


@pytest.fixture
def split_dir(tmp_path):
    """A data folder with train/ and test/ of the ENTRIES, 20x12 images of known colours."""
    for split in ("train", "test"):
        folder = tmp_path / split
        folder.mkdir()
        write_digit_struct(folder / "digitStruct.mat", ENTRIES)
        for i, (name, _) in enumerate(ENTRIES):
            image = np.full((12, 20, 3), 40 * i + 10, np.uint8)  # constant per image
            image[..., 1] = 7
            Image.fromarray(image).save(folder / name)
    return tmp_path


def test_read_digit_struct_fixture(split_dir):
    entries = svhn.read_digit_struct(str(split_dir / "train" / "digitStruct.mat"))
    assert [e.name for e in entries] == ["1.png", "2.png", "3.png", "4.png"]
    assert [e.digits for e in entries] == [(0,), (2, 1, 0), (1, 2, 3, 4, 5, 6), (7, 3)]
    np.testing.assert_array_equal(entries[0].boxes, [[2, 3, 4, 5]])
    np.testing.assert_array_equal(entries[1].boxes, [[4, 2, 3, 6], [8, 3, 2, 6], [11, 2, 3, 7]])
    assert [e.name for e in svhn.read_digit_struct(
        str(split_dir / "train" / "digitStruct.mat"), limit=2)] == ["1.png", "2.png"]


def test_read_errors_name_file_and_entry(tmp_path):
    path = tmp_path / "digitStruct.mat"
    write_digit_struct(path, [("1.png", [(1, 0, 0, 2, 2)]), ("2.png", [])])
    with pytest.raises(ValueError, match=r"digitStruct.mat, entry 2 \(2.png\): zero digits"):
        svhn.read_digit_struct(str(path))
    write_digit_struct(path, ENTRIES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"digitStruct.mat: cannot be read as a MATLAB v7.3"):
        svhn.read_digit_struct(str(path))


def test_missing_image_is_named(split_dir):
    (split_dir / "test" / "4.png").unlink()
    with pytest.raises(ValueError, match=r"entry 4 \(4.png\): the image .*4.png is missing"):
        svhn.prepare_split(str(split_dir), "test", size=64, cache_dir=str(split_dir / "c"))
    # limit=3 reads only what is there (and drops the 6-digit third).
    assert len(svhn.prepare_split(str(split_dir), "test", size=64, limit=3,
                                  cache_dir=str(split_dir / "c")).labels) == 2


def test_box_arithmetic_by_hand():
    union, clipped = svhn.number_box(np.array([[4., 2, 3, 6], [8, 3, 2, 6], [11, 2, 3, 7]]),
                                     (20, 12))
    assert union.tolist() == [4, 2, 14, 9] and not clipped
    union, clipped = svhn.number_box(np.array([[15., 4, 3, 5], [18, 4, 4, 5]]), (20, 12))
    assert union.tolist() == [15, 4, 20, 9] and clipped  # 22 clipped to the width 20
    # 20x20 box centred (20, 30): x1.3 -> 26x26; x2.6 -> 52x52 for the 128 framing.
    assert svhn.frame_box(np.array([10., 20, 30, 40]), size=64).tolist() == [7, 17, 33, 43]
    assert svhn.frame_box(np.array([10., 20, 30, 40]), size=128).tolist() == [-6, 4, 46, 56]


def test_crop_resize_by_hand():
    ramp = np.tile((10 * np.arange(8) + 5).astype(np.uint8)[None, :, None], (8, 1, 3))
    # Same size, integer box: an exact copy.
    np.testing.assert_array_equal(svhn.crop_resize(ramp, np.array([2., 1, 6, 5]), 4),
                                  ramp[1:5, 2:6])
    # Halving: an interior output pixel j averages the ramp symmetrically about input x = 2j+1,
    # where the ramp (value 10 x at continuous x, pixel centres at x + 0.5) is 20 j + 10.
    assert svhn.crop_resize(ramp, np.array([0., 0, 8, 8]), 4)[3, 1:3, 0].tolist() == [30, 50]
    # Doubling: output pixel j reads x = (j + 0.5) / 2: 5 j + 2.5, rounded half up.
    assert svhn.crop_resize(ramp, np.array([0., 0, 8, 8]), 16)[5, 1:5, 0].tolist() == [
        8, 13, 18, 23]
    # A box past the image repeats the edge pixels.
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, -1)
    np.testing.assert_array_equal(svhn.crop_resize(image, np.array([-2., -2, 6, 6]), 8),
                                  np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge"))


def test_labels():
    assert svhn.encode_labels((7, 3)).tolist() == [7, 3, 10, 10, 10]
    assert svhn.decode_labels(np.array([7, 3, 10, 10, 10])) == "73"
    with pytest.raises(ValueError, match="1-5 entries"):
        svhn.encode_labels((1,) * 6)


def test_prepare_counts_and_cache(split_dir, monkeypatch):
    cache = str(split_dir / "cache")
    prepared = svhn.prepare_split(str(split_dir), "train", size=64, cache_dir=cache)
    assert prepared.labels.tolist() == [[0, 10, 10, 10, 10], [2, 1, 0, 10, 10],
                                        [7, 3, 10, 10, 10]]
    assert (prepared.meta["entries"], prepared.meta["dropped_long"],
            prepared.meta["clipped"]) == (4, 1, 1)
    assert prepared.images.shape == (3, 64, 64, 3) and prepared.images.dtype == np.uint8
    # Each fixture image is one colour (4.png is the third kept: 40 * 3 + 10).
    assert np.all(prepared.images[2, ..., 0] == 130) and np.all(prepared.images[..., 1] == 7)

    def no_decoding(*args):
        raise AssertionError("a PNG was decoded again")

    monkeypatch.setattr(svhn, "_decode_path", no_decoding)
    again = svhn.prepare_split(str(split_dir), "train", size=64, cache_dir=cache)
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again.images, prepared.images)


def test_dataset_batches(split_dir):
    ds = svhn.SvhnDataset(str(split_dir), size=64, seed=0, num_validation=1, crop=54,
                          random_crop=True, cache_dir=str(split_dir / "cache"))
    assert (ds.num_train, ds.num_test, ds.image_shape) == (2, 3, (54, 54, 3))
    a = ds.train_batch(5, 4, sharding=_sharding())
    b = ds.train_batch(5, 4, sharding=_sharding())
    assert a["image"].shape == (4, 54, 54, 3) and a["label"].shape == (4, 5)
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    batches = list(ds.test_batches(2, sharding=_sharding()))
    assert [float(np.sum(t["mask"])) for t in batches] == [2.0, 1.0]
    # Evaluation takes the centre crop: rows 5..58 of the 64.
    full = svhn.prepare_split(str(split_dir), "test", size=64, cache_dir=str(split_dir / "cache"))
    np.testing.assert_allclose(np.asarray(batches[0]["image"][1]),
                               full.images[1, 5:59, 5:59] / 255.0, rtol=1e-6)
    assert svhn.crop_batch(np.arange(32).reshape(2, 4, 4, 1), np.array([[0, 0], [2, 1]]),
                           2)[1, ..., 0].tolist() == [[22, 23], [26, 27]]


@needs_sample
def test_real_sample():
    entries = svhn.read_digit_struct(str(SAMPLE / "test" / "digitStruct.mat"))
    assert entries[1].name == "2.png" and "".join(map(str, entries[1].digits)) == "210"
    with Image.open(SAMPLE / "test" / "2.png") as im:
        width, height = im.size
    boxes = entries[1].boxes
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 0] + boxes[:, 2] <= width)
    assert np.all(boxes[:, 1] >= 0) and np.all(boxes[:, 1] + boxes[:, 3] <= height)
    train = svhn.read_digit_struct(str(SAMPLE / "train" / "digitStruct.mat"), limit=1)
    assert train[0].digits == (1, 9)
    with Image.open(SAMPLE / "train" / "1.png") as im:
        assert im.size == (741, 350)


@needs_sample
def test_real_sample_prepare(tmp_path):
    with pytest.raises(ValueError, match=r"entry 4 \(4.png\): the image .* is missing"):
        svhn.prepare_split(str(SAMPLE), "test", size=64, cache_dir=str(tmp_path))
    prepared = svhn.prepare_split(str(SAMPLE), "test", size=128, limit=3,
                                  cache_dir=str(tmp_path))
    assert [svhn.decode_labels(r) for r in prepared.labels] == ["5", "210", "6"]
    assert prepared.images.shape == (3, 128, 128, 3)


# ------------------------------------------------------------------------- mnist_sequences


def _box_digit():
    digit = np.zeros((1, 5, 28, 28), np.float32)
    digit[:, :, 4:24, 4:24] = 1.0  # ink fills MNIST's central 20x20 box
    return digit


@pytest.mark.parametrize("size,inside,outside", [(64, 10, 5), (128, 43, 37)])
def test_render_framing_by_hand(size, inside, outside):
    # One digit, no rotation, scale, jitter or frame noise: its 20x20 ink box is the number's
    # box, and fills +-1/1.3 (64) or +-1/2.6 (128) of the canvas in normalised coordinates.
    # Pixel x has u = (2x + 1) / size - 1: 64: |u| <= 0.7 from x = 10, |u| >= 0.85 up to
    # x = 4; 128: |u| <= 0.33 from x = 43 (u = -0.320), |u| >= 0.42 up to x = 36.
    images, params = mnist_sequences.render_numbers(
        jax.random.key(0), _box_digit(), jnp.array([1]), size=size, rotation_deg=0.0,
        scale=(1.0, 1.0), jitter=0.0, frame_jitter=0.0, textured=False)
    ink = np.asarray(params["ink"][0, ..., 0])
    assert np.all(ink[inside:size - inside, inside:size - inside] > 0.999)
    assert np.all(ink[:, : outside + 1] == 0) and np.all(ink[: outside + 1] == 0)
    assert np.all(ink[:, size - outside - 1:] == 0) and np.all(ink[size - outside - 1:] == 0)
    np.testing.assert_array_equal(np.asarray(images[0, ..., 0]), ink)


def test_render_two_digits_side_by_side():
    # Two digits at scale 1 with no gap: centres 16 px apart, box 36 wide x 20 high, framed to
    # 46.8 x 26 px of number space over 64 px: the blank column between the ink boxes is none,
    # and the ink spans |u| <= 1/1.3 horizontally.
    digits = _box_digit()
    images, params = mnist_sequences.render_numbers(
        jax.random.key(0), digits, jnp.array([2]), rotation_deg=0.0, scale=(1.0, 1.0),
        gap=(0.0, 0.0), jitter=0.0, frame_jitter=0.0, textured=False)
    ink = np.asarray(params["ink"][0, ..., 0])
    assert np.all(ink[10:54, 10:54] > 0.999)  # one merged block 
    theta = np.asarray(params["theta"][0])
    # x scale: canvas u -> digit normalised: half-frame 23.4 px / 14 px per unit.
    np.testing.assert_allclose(theta[:, 0, 0], 36 / 2 * 1.3 / 14, rtol=1e-5)
    np.testing.assert_allclose(theta[1, 0, 2] - theta[0, 0, 2], -16 / 14, rtol=1e-5)


def test_draw_numbers_labels():
    pool = np.arange(10, dtype=np.int32)
    index, lengths, labels = mnist_sequences.draw_numbers(np.random.default_rng(1), pool, 500)
    assert lengths.min() == 1 and lengths.max() == 5
    slots = np.arange(5)[None] < lengths[:, None]
    np.testing.assert_array_equal(labels[slots], pool[index][slots])
    assert np.all(labels[~slots] == svhn.BLANK)


def test_sequences_dataset_is_pure_in_the_step():
    ds = mnist_sequences.MnistSequencesDataset(size=64, seed=3, num_test=10)
    a, b = (ds.train_batch(7, 8, sharding=_sharding()) for _ in range(2))
    c = ds.train_batch(8, 8, sharding=_sharding())
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))
    assert a["image"].shape == (8, 64, 64, 3) and a["label"].shape == (8, 5)
    image = np.asarray(a["image"])
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    batches = list(ds.test_batches(8, sharding=_sharding()))
    assert [float(np.sum(t["mask"])) for t in batches] == [8.0, 2.0]
    assert ds.picture_examples(3)["label"].shape == (3, 5)

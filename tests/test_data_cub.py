"""CUB-200-2011 readers (official layout; TFDS's missing-data error) and the grain pipeline."""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from stn_jax.data import cub

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "cub_200_2011_sample" / "CUB_200_2011"

# Fixture: classes 3, 7, 12 and 20 of which 20 has no image; image ids not 1..N and listed in a
# different order in each file.  id: (class, is_train, (w, h), box x y w h)
IMAGES = {
    17: (7, 1, (40, 30), (2.0, 3.0, 20.0, 10.0)),
    5: (3, 1, (30, 40), (0.0, 0.0, 30.0, 40.0)),
    40: (12, 0, (36, 32), (30.0, 25.0, 10.0, 9.0)),  # past the right and bottom edges
    41: (3, 0, (32, 32), (-1.0, 4.0, 8.0, 8.0)),  # starts left of the image
    3: (12, 1, (32, 48), (5.0, 5.0, 5.0, 5.0)),
}
CLASSES = {3: "003.Sooty_Albatross", 7: "007.Parakeet_Auklet", 12: "012.Yellow_headed_Blackbird",
           20: "020.Yellow_breasted_Chat"}


def _image(key: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 6 % 256, yy * 5 % 256, np.full_like(xx, key * 9 % 256)],
                    -1).astype(np.uint8)


def write_layout(root: pathlib.Path, *, bad: dict[str, str] | None = None) -> pathlib.Path:
    """Writes a tiny official CUB_200_2011 layout under root; `bad` replaces whole files."""
    base = root / "CUB_200_2011"
    for key, (cls, _, (w, h), _) in IMAGES.items():
        folder = base / "images" / CLASSES[cls]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(key, w, h)).save(folder / f"bird_{key}.png")
    order = sorted(IMAGES, key=lambda k: -k)  # not the id order
    files = {
        "images.txt": "".join(f"{k} {CLASSES[IMAGES[k][0]]}/bird_{k}.png\n" for k in order),
        "image_class_labels.txt": "".join(f"{k} {IMAGES[k][0]}\n" for k in sorted(IMAGES)),
        "train_test_split.txt": "".join(f"{k} {IMAGES[k][1]}\n" for k in order),
        "bounding_boxes.txt": "".join(
            f"{k} " + " ".join(f"{v:.1f}" for v in IMAGES[k][3]) + "\n" for k in sorted(IMAGES)),
        "classes.txt": "".join(f"{c} {n}\n" for c, n in CLASSES.items()),
    }
    files.update(bad or {})
    for name, text in files.items():
        (base / name).write_text(text)
    return base


@pytest.fixture
def layout(tmp_path):
    return write_layout(tmp_path)


def _sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def test_dir_reader_joins_by_id_maps_labels_and_clips_boxes(layout):
    data = cub.load_cub(source="dir", dir=str(layout))
    assert data.source == "dir"
    np.testing.assert_array_equal(data.class_ids, [3, 7, 12, 20])
    assert data.class_names[1] == "007.Parakeet_Auklet"
    np.testing.assert_array_equal(data.train.image_ids, [3, 5, 17])
    np.testing.assert_array_equal(data.train.labels, [2, 0, 1])  # 12 -> 2, 3 -> 0, 7 -> 1
    np.testing.assert_array_equal(data.test.image_ids, [40, 41])
    np.testing.assert_array_equal(data.test.labels, [2, 0])
    np.testing.assert_array_equal(data.train.boxes[2], [2, 3, 20, 10])
    np.testing.assert_array_equal(data.test.boxes[0], [30, 25, 6, 7])  # 36x32 image
    np.testing.assert_array_equal(data.test.boxes[1], [0, 4, 7, 8])
    assert data.train.paths[0].endswith("012.Yellow_headed_Blackbird/bird_3.png")


def test_dir_reader_class_subset_is_contiguous(layout):
    data = cub.read_cub_dir(str(layout), class_ids=[12, 3])
    np.testing.assert_array_equal(data.class_ids, [3, 12])
    np.testing.assert_array_equal(data.train.image_ids, [3, 5])
    np.testing.assert_array_equal(data.train.labels, [1, 0])
    np.testing.assert_array_equal(data.test.labels, [1, 0])
    with pytest.raises(ValueError, match=r"not there: \[4\]"):
        cub.read_cub_dir(str(layout), class_ids=[3, 4])


@pytest.mark.parametrize("name, text, message", [
    ("bounding_boxes.txt", "5 0 0 30 40\n17 2 3 x 10\n",
     r"bounding_boxes.txt:2: expected '<image_id> <x> <y> <width> <height>'"),
    ("train_test_split.txt", "17 1\n5 1\n40 0\n41 2\n3 1\n",
     r"train_test_split.txt:4: is_training_image must be 0 or 1, got 2"),
    ("image_class_labels.txt", "3 12\n5 3\n17 7\n40 12\n41 3\n41 3\n",
     r"image_class_labels.txt:6: id 41 appears a second time"),
    ("image_class_labels.txt", "3 12\n5 3\n17 7\n40 12\n",
     r"images.txt:1: image id 41 has no line in image_class_labels.txt"),
    ("image_class_labels.txt", "3 12\n5 3\n17 9\n40 12\n41 3\n",
     r"image_class_labels.txt:3: class 9 is not in classes.txt"),
])
def test_dir_reader_names_file_and_line_of_bad_data(tmp_path, name, text, message):
    base = write_layout(tmp_path, bad={name: text})
    with pytest.raises(cub.CubFormatError, match=message):
        cub.read_cub_dir(str(base))


def test_missing_data_errors_say_where(tmp_path, layout):
    with pytest.raises(FileNotFoundError, match="is not a folder.*--config.data.dir"):
        cub.load_cub(source="dir", dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="data.dir must name"):
        cub.load_cub(source="dir", dir="")
    os.remove(layout / "images" / CLASSES[7] / "bird_17.png")
    with pytest.raises(FileNotFoundError, match=r"bird_17.png: missing \(listed in .*images.txt:3"):
        cub.read_cub_dir(str(layout))
    with pytest.raises(FileNotFoundError, match="caltech_birds2011 is not prepared"):
        cub.load_cub(source="tfds", tfds_dir=str(tmp_path / "tfds"))


def test_centre_crop_and_random_crop_are_slices_of_the_image(layout):
    data = cub.load_cub(source="dir", dir=str(layout))
    # resize == the shorter side: no resampling, so crops are exact slices of the pixels.
    image = _image(5, 30, 40)  # train example 1 (id 5), shorter side 30
    out = cub.process(image, resize=30, size=20)
    np.testing.assert_array_equal(out, image[10:30, 5:25])
    rng = np.random.default_rng(3)
    top, left, flip = cub.crop_params(np.random.default_rng(3), image.shape, 20)
    out = cub.process(image, resize=30, size=20, rng=rng)
    want = image[top:top + 20, left:left + 20]
    np.testing.assert_array_equal(out, want[:, ::-1] if flip else want)
    # Resizing: shorter side 40 -> 20 halves both sides.
    assert cub.resize_shorter(image, 15).shape == (20, 15, 3)
    decoded, scale = cub.decode(data.train, 1, min_side=30)
    np.testing.assert_array_equal(decoded, image)
    assert scale == 1.0


def test_train_batches_are_pure_in_the_step_and_cover_each_epoch(layout):
    data = cub.load_cub(source="dir", dir=str(layout))
    sharding = _sharding()
    a = cub.CubDataset(data, size=16, resize=24, seed=1, num_threads=2)
    b = cub.CubDataset(data, size=16, resize=24, seed=1, num_threads=2)
    batches = [a.train_batch(s, 3, sharding=sharding) for s in range(3)]
    assert batches[0]["image"].shape == (3, 16, 16, 3) and batches[0]["image"].dtype == np.uint8
    # batch == num_train: each step is one epoch, a permutation of the training labels.
    for batch in batches:
        np.testing.assert_array_equal(np.sort(np.asarray(batch["label"])), [0, 1, 2])
    again = b.train_batch(2, 3, sharding=sharding)  # straight to step 2
    np.testing.assert_array_equal(np.asarray(again["image"]), np.asarray(batches[2]["image"]))
    # A process holding rows 1:3 builds exactly those rows of the global batch.
    part = next(b.local_train_batches(1, 3, slice(1, 3)))
    np.testing.assert_array_equal(part["image"], np.asarray(batches[1]["image"])[1:3])
    np.testing.assert_array_equal(part["label"], np.asarray(batches[1]["label"])[1:3])
    other_seed = cub.CubDataset(data, size=16, resize=24, seed=2).train_batch(
        2, 3, sharding=sharding)
    assert not np.array_equal(np.asarray(other_seed["image"]), np.asarray(again["image"]))


def test_test_batches_are_centre_crops_padded_with_a_mask(layout):
    data = cub.load_cub(source="dir", dir=str(layout))
    ds = cub.CubDataset(data, size=16, resize=32, num_threads=2)
    batches = list(ds.test_batches(3, sharding=_sharding()))
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0]["mask"], [1, 1, 0])
    np.testing.assert_array_equal(batches[0]["label"], [2, 0, 0])
    want = cub.process(_image(41, 32, 32), resize=32, size=16)
    np.testing.assert_array_equal(np.asarray(batches[0]["image"][1]), want)
    np.testing.assert_array_equal(np.asarray(batches[0]["image"][2]), 0)
    pics = ds.picture_examples(5)
    assert pics["image"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(pics["image"][1], want)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real CUB sample not found at {SAMPLE}")
def test_real_sample_reads_and_batches():
    data = cub.load_cub(source="dir", dir=str(SAMPLE))
    np.testing.assert_array_equal(data.class_ids, np.arange(1, 11))
    assert (len(data.train), len(data.test)) == (300, 243)  # 543 images, official split
    assert set(np.unique(data.train.labels)) == set(range(10))
    assert data.class_names[0] == "001.Black_footed_Albatross"
    for split in (data.train, data.test):
        sizes = [Image.open(p).size for p in split.paths[:40]]
        boxes = split.boxes[:40]
        assert (boxes >= 0).all() and (boxes[:, 2:] > 0).all()
        assert all(x + w <= sw and y + h <= sh for (x, y, w, h), (sw, sh) in zip(boxes, sizes))
    ds = cub.CubDataset(data, size=224, resize=256, num_threads=2)
    batch = ds.train_batch(0, 4, sharding=_sharding())
    assert batch["image"].shape == (4, 224, 224, 3)
    # Real photographs: far from constant.
    assert float(np.asarray(batch["image"], np.float32).std()) > 20

"""CUB-200-2011 (Caltech-UCSD Birds): readers of the official layout and TFDS, and the pipeline.

Sources (`load_cub(source=...)`):

- ``"dir"``: the official ``CUB_200_2011/`` folder: ``images/NNN.Name/*.jpg``, ``images.txt``
  (id path), ``image_class_labels.txt`` (id class), ``train_test_split.txt`` (id is_train),
  ``bounding_boxes.txt`` (id x y w h, pixels) and ``classes.txt`` (class_id name). The files
  are joined by image id (ids need not be 1..N nor in the same order), any subset of the class
  ids maps to the contiguous labels 0..K-1 in increasing class id, and boxes are clipped to the
  image (some official boxes run a pixel or two past the edge). A bad line raises one
  `CubFormatError` naming the file and the line.
- ``"tfds"``: TFDS ``caltech_birds2011`` when it is prepared in the ``array_record`` format
  (read with ``tfds.data_source``, no TensorFlow needed); labels 0-199, boxes converted from
  TFDS's normalised (ymin, xmin, ymax, xmax) to pixels. It is not downloaded here: preparing
  it needs TensorFlow and a network (``tfds build caltech_birds2011
  --file_format=array_record``).

Pipeline (`CubDataset`): on grain. Each example is decoded (JPEG, with PIL's draft mode that
lets libjpeg scale down by 1/2, 1/4, 1/8 while decoding), its shorter side resized to
`resize` pixels, then cut to `size` x `size`: a random crop and a random horizontal flip for
training, the centre crop for the test. Images leave as uint8 RGB (B, size, size, 3); the model
applies its backbone's input convention on the device. Every training batch is a pure function
of (seed, step): global position p = step * batch_size + row reads example
`permutation(seed, epoch)[p % num_train]` with epoch = p // num_train, and its crop and flip are
drawn from a generator seeded with (seed, step, row). Each process builds only its rows of the
batch (`stn_jax.data.batching.local_rows`); grain decodes them in `num_threads` threads (and in
`num_workers` processes when > 0) and keeps `prefetch` batches ahead.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Iterator

import numpy as np

from stn_jax.data import batching

SOURCES = ("dir", "tfds")
TEXT_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt",
              "bounding_boxes.txt", "classes.txt")
TFDS_NAME = "caltech_birds2011"


class CubFormatError(ValueError):
    """A file of the CUB layout that does not read as the official format (file and line)."""


@dataclasses.dataclass(frozen=True)
class CubSplit:
    """One split of CUB: where each image is, its label and its box.

    Attributes:
        image_ids: (N,) int64 official image ids.
        labels: (N,) int32 contiguous labels 0..K-1.
        boxes: (N, 4) float32 (x, y, w, h) in pixels of the original image, clipped to it.
        paths: N absolute JPEG paths (source "dir"), or None.
        tfds_source: the TFDS data source with `tfds_index` (source "tfds"), or None.
        tfds_index: (N,) int64 rows of `tfds_source`, or None.
    """

    image_ids: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    paths: tuple[str, ...] | None = None
    tfds_source: Any = None
    tfds_index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class CubData:
    """CUB read from a source: the two official splits and the class names.

    Attributes:
        train, test: the official training and test splits.
        class_ids: (K,) official class ids kept; label k is class_ids[k].
        class_names: K names (e.g. "001.Black_footed_Albatross").
        source: "dir" or "tfds".
    """

    train: CubSplit
    test: CubSplit
    class_ids: np.ndarray
    class_names: tuple[str, ...]
    source: str


# ------------------------------------------------------------------------------ "dir" reader


def _read_table(path: str, types: tuple[type, ...], what: str) -> dict[int, tuple]:
    """{id: fields} of a whitespace-separated file whose lines are `id field...`.

    The last field of a str-typed table takes the rest of the line (paths may hold spaces).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (the official CUB_200_2011 layout has it)")
    table: dict[int, tuple] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=len(types))
            try:
                if len(parts) != len(types) + 1:
                    raise ValueError(f"{len(parts)} fields")
                key = int(parts[0])
                fields = tuple(t(p) for t, p in zip(types, parts[1:]))
            except ValueError as e:
                raise CubFormatError(
                    f"{path}:{lineno}: expected '{what}', got {line.rstrip()!r} ({e})") from None
            if key in table:
                raise CubFormatError(f"{path}:{lineno}: id {key} appears a second time")
            table[key] = fields
    return table


def _line_of(path: str, key: int) -> int:
    """The line number of `key` in `path` (for error messages only)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.split(maxsplit=1)[:1] == [str(key)]:
                return lineno
    return 0


def clip_box(box, width: int, height: int) -> np.ndarray:
    """Clips an (x, y, w, h) pixel box to a width x height image.

    Example:
        >>> clip_box([-2.0, 5.0, 10.0, 100.0], 8, 50).tolist()
        [0.0, 5.0, 8.0, 45.0]
    """
    x, y, w, h = (float(v) for v in box)
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return np.array([x0, y0, x1 - x0, y1 - y0], np.float32)


def read_cub_dir(root: str, *, class_ids=None) -> CubData:
    """Reads the official `CUB_200_2011/` layout.

    Args:
        root: the folder holding `images.txt`, ..., `images/`.
        class_ids: official class ids to keep (any subset, any order), or None for every class
            in `classes.txt`. Labels are 0..K-1 in increasing class id.

    Returns:
        `CubData` with both splits in increasing image id, boxes clipped to each image (the
        JPEG header gives its size).

    Raises:
        FileNotFoundError: a text file or an image is missing (named).
        CubFormatError: a malformed line, a duplicate id, an id missing from one of the
            files, an is_train other than 0/1, a class id not in classes.txt, an empty box
            (file and line named).

    Example:
        >>> data = read_cub_dir("/data/CUB_200_2011", class_ids=[1, 2, 3])  # doctest: +SKIP
        >>> data.train.labels.max()                                          # doctest: +SKIP
        2
    """
    from PIL import Image  # Pillow is a dependency; imported here to keep imports light.

    p = {name: os.path.join(root, name) for name in TEXT_FILES}
    images = _read_table(p["images.txt"], (str,), "<image_id> <path>")
    labels = _read_table(p["image_class_labels.txt"], (int,), "<image_id> <class_id>")
    split = _read_table(p["train_test_split.txt"], (int,), "<image_id> <is_training_image>")
    boxes = _read_table(p["bounding_boxes.txt"], (float, float, float, float),
                        "<image_id> <x> <y> <width> <height>")
    classes = _read_table(p["classes.txt"], (str,), "<class_id> <class_name>")

    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", boxes)):
        for key in images.keys() - table.keys():
            raise CubFormatError(f"{p['images.txt']}:{_line_of(p['images.txt'], key)}: "
                                 f"image id {key} has no line in {name}")
        for key in table.keys() - images.keys():
            raise CubFormatError(f"{p[name]}:{_line_of(p[name], key)}: image id {key} is not "
                                 "in images.txt")
    for key, (is_train,) in split.items():
        if is_train not in (0, 1):
            raise CubFormatError(f"{p['train_test_split.txt']}:"
                                 f"{_line_of(p['train_test_split.txt'], key)}: is_training_image "
                                 f"must be 0 or 1, got {is_train}")
    for key, (cls,) in labels.items():
        if cls not in classes:
            raise CubFormatError(f"{p['image_class_labels.txt']}:"
                                 f"{_line_of(p['image_class_labels.txt'], key)}: class {cls} is "
                                 "not in classes.txt")
    for key, box in boxes.items():
        if box[2] <= 0 or box[3] <= 0:
            raise CubFormatError(f"{p['bounding_boxes.txt']}:"
                                 f"{_line_of(p['bounding_boxes.txt'], key)}: box width and height "
                                 f"must be positive, got {box}")

    if class_ids is None:
        kept = np.array(sorted(classes), np.int64)
    else:
        kept = np.array(sorted({int(c) for c in class_ids}), np.int64)
        unknown = [int(c) for c in kept if c not in classes]
        if unknown or not len(kept):
            raise ValueError(f"class_ids must be a non-empty subset of the ids in "
                             f"{p['classes.txt']}; not there: {unknown}")
    label_of = {int(c): k for k, c in enumerate(kept)}

    def make(is_train: int) -> CubSplit:
        ids = sorted(k for k in images if split[k][0] == is_train and labels[k][0] in label_of)
        paths, clipped = [], []
        for key in ids:
            path = os.path.join(root, "images", images[key][0].strip())
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing (listed in {p['images.txt']}:"
                                        f"{_line_of(p['images.txt'], key)})")
            with Image.open(path) as im:  # Reads the header only.
                width, height = im.size
            box = clip_box(boxes[key], width, height)
            if box[2] <= 0 or box[3] <= 0:
                raise CubFormatError(
                    f"{p['bounding_boxes.txt']}:{_line_of(p['bounding_boxes.txt'], key)}: box "
                    f"{boxes[key]} lies outside the {width}x{height} image {path}")
            paths.append(path)
            clipped.append(box)
        return CubSplit(
            image_ids=np.array(ids, np.int64),
            labels=np.array([label_of[labels[k][0]] for k in ids], np.int32),
            boxes=np.array(clipped, np.float32).reshape(-1, 4),
            paths=tuple(paths))

    return CubData(train=make(1), test=make(0), class_ids=kept,
                   class_names=tuple(classes[int(c)][0].strip() for c in kept), source="dir")


# ------------------------------------------------------------------------------ TFDS reader


def read_cub_tfds(*, data_dir: str = "", class_ids=None) -> CubData:
    """Reads TFDS `caltech_birds2011` prepared in the array_record format (no download here).

    Args:
        data_dir: the TFDS data_dir ("" = TFDS's default).
        class_ids: official class ids (1-200) to keep, or None for all 200.

    Raises:
        FileNotFoundError: the dataset is not prepared (says how to prepare it, or to use the
            "dir" source).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise FileNotFoundError(f"TFDS is not installed ({e}); use data.source='dir'") from e
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir or None)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS {TFDS_NAME} is not prepared under {builder.data_dir!r}. Prepare it where "
            f"TensorFlow and a network are available (`tfds build {TFDS_NAME} "
            "--file_format=array_record`), or download CUB_200_2011 and set "
            "--config.data.source=dir --config.data.dir=PATH/CUB_200_2011")
    file_format = getattr(builder.info, "file_format", None)
    formats = {str(getattr(file_format, "value", file_format))} if file_format else set()
    if formats and not any("array_record" in f for f in formats):
        raise FileNotFoundError(
            f"TFDS {TFDS_NAME} under {builder.data_dir!r} is in {formats}, not array_record, "
            "which needs TensorFlow to read; rebuild it with --file_format=array_record or use "
            "data.source='dir'")
    all_ids = np.arange(1, 201) if class_ids is None else np.array(sorted(set(class_ids)))
    if len(all_ids) == 0 or all_ids.min() < 1 or all_ids.max() > 200:
        raise ValueError(f"class_ids must be a non-empty subset of 1..200, got {class_ids}")
    label_of = {int(c) - 1: k for k, c in enumerate(all_ids)}  # TFDS labels are class id - 1.
    names = builder.info.features["label"].names

    def make(split: str) -> CubSplit:
        source = tfds.data_source(TFDS_NAME, split=split, data_dir=data_dir or None)
        rows, labels, boxes = [], [], []
        for i in range(len(source)):
            ex = source[i]
            if int(ex["label"]) not in label_of:
                continue
            h, w = ex["image"].shape[:2]
            # TFDS boxes are normalised (ymin, xmin, ymax, xmax).
            ymin, xmin, ymax, xmax = np.asarray(ex["bbox"], np.float64)
            rows.append(i)
            labels.append(label_of[int(ex["label"])])
            boxes.append(clip_box([xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h],
                                  w, h))
        return CubSplit(image_ids=np.array(rows, np.int64), labels=np.array(labels, np.int32),
                        boxes=np.array(boxes, np.float32).reshape(-1, 4), tfds_source=source,
                        tfds_index=np.array(rows, np.int64))

    return CubData(train=make("train"), test=make("test"), class_ids=all_ids,
                   class_names=tuple(names[int(c) - 1] for c in all_ids), source="tfds")


def load_cub(*, source: str, dir: str = "", tfds_dir: str = "", class_ids=None) -> CubData:
    """CUB from `source` ("dir": the official folder `dir`; "tfds": TFDS caltech_birds2011).

    Raises:
        ValueError: unknown source, or source="dir" without `dir`.
        FileNotFoundError: the data is not there (the message says where it is looked for).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "tfds":
        return read_cub_tfds(data_dir=tfds_dir, class_ids=class_ids)
    if not dir:
        raise ValueError("data.dir must name the CUB_200_2011 folder for source='dir' "
                         "(e.g. --config.data.dir=/data/CUB_200_2011)")
    if not os.path.isdir(dir):
        raise FileNotFoundError(
            f"data.dir={dir!r} is not a folder. Download CUB_200_2011.tgz (Caltech's CUB page), "
            "unpack it and pass --config.data.dir=PATH/CUB_200_2011")
    return read_cub_dir(dir, class_ids=class_ids)


# ------------------------------------------------------------------------------ images


def decode(split: CubSplit, index: int, *, min_side: int):
    """RGB uint8 (H, W, 3) of example `index`, decoded at a size whose shorter side is still at
    least `min_side` (JPEG draft mode), and the scale factor from the original pixels."""
    from PIL import Image

    if split.paths is not None:
        im = Image.open(split.paths[index])
        full = im.size
        if im.format == "JPEG":
            # draft() keeps both sides >= the request; ask so the shorter side stays >= min_side.
            w, h = im.size
            f = min_side / min(w, h)
            im.draft("RGB", (max(1, int(np.ceil(w * f))), max(1, int(np.ceil(h * f)))))
        arr = np.asarray(im.convert("RGB"))
        return arr, arr.shape[1] / full[0]
    ex = split.tfds_source[int(split.tfds_index[index])]
    image = np.asarray(ex["image"])
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    return image, 1.0


def resize_shorter(image: np.ndarray, side: int) -> np.ndarray:
    """Resizes (H, W, 3) uint8 so that its shorter side is `side` (bilinear, antialiased).

    Example:
        >>> resize_shorter(np.zeros((100, 50, 3), np.uint8), 20).shape
        (40, 20, 3)
    """
    from PIL import Image

    h, w = image.shape[:2]
    f = side / min(h, w)
    size = (max(side, int(round(w * f))), max(side, int(round(h * f))))
    if size == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=None))


def crop_params(rng: np.random.Generator | None, shape, size: int) -> tuple[int, int, bool]:
    """(top, left, flip) of a `size` crop of an (H, W) image: random with `rng`, else centre.

    Example:
        >>> crop_params(None, (10, 14), 8)
        (1, 3, False)
    """
    h, w = shape[:2]
    if rng is None:
        return (h - size) // 2, (w - size) // 2, False
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)), bool(
        rng.integers(0, 2))


def process(image: np.ndarray, *, resize: int, size: int, rng=None) -> np.ndarray:
    """The model's input from a decoded image: shorter side to `resize`, then a `size` crop
    (random crop and flip with `rng`, centre crop without). uint8 (size, size, 3)."""
    image = resize_shorter(image, resize)
    top, left, flip = crop_params(rng, image.shape, size)
    out = image[top:top + size, left:left + size]
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


# ------------------------------------------------------------------------------ pipeline


def _train_index(seed: int, num: int, position: int) -> int:
    epoch, offset = divmod(position, num)
    return int(_permutation(seed, num, epoch)[offset])


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, num: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num)


class _Examples:
    """The per-example work grain runs in its threads/workers (picklable: plain data)."""

    def __init__(self, split: CubSplit, *, resize: int, size: int, seed: int):
        self.split, self.resize, self.size, self.seed = split, resize, size, seed

    def train(self, step_row_batch: tuple[int, int, int]) -> dict[str, np.ndarray]:
        step, row, batch_size = step_row_batch
        index = _train_index(self.seed, len(self.split), step * batch_size + row)
        rng = np.random.default_rng([self.seed, step, row, 1])
        image, _ = decode(self.split, index, min_side=self.resize)
        return {"image": process(image, resize=self.resize, size=self.size, rng=rng),
                "label": self.split.labels[index]}

    def test(self, index: int) -> dict[str, np.ndarray]:
        if index < 0:  # Padding row of the last batch.
            return {"image": np.zeros((self.size, self.size, 3), np.uint8),
                    "label": np.int32(0), "mask": np.float32(0)}
        image, _ = decode(self.split, index, min_side=self.resize)
        return {"image": process(image, resize=self.resize, size=self.size),
                "label": self.split.labels[index], "mask": np.float32(1)}


def _stack(items) -> dict[str, np.ndarray]:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


class CubDataset:
    """CUB batches for the training loop (the `stn_jax.tasks.base.Dataset` interface).

    Args:
        data: `CubData` from `load_cub`.
        size: side of the model's input (e.g. 448 or 224).
        resize: shorter side before cropping (e.g. 512 for size 448) [?].
        seed: seeds the order of the training examples and their crops and flips.
        num_threads: grain threads decoding examples in each process.
        num_workers: grain worker processes (0 = decode in this process's threads).
        prefetch: batches (grain: examples x batch) kept ready ahead.

    Example:
        >>> ds = CubDataset(load_cub(source="dir", dir=root), size=224, resize=256)  # doctest: +SKIP
        >>> ds.train_batch(0, 32, sharding=sharding)["image"].shape                  # doctest: +SKIP
        (32, 224, 224, 3)
    """

    def __init__(self, data: CubData, *, size: int, resize: int, seed: int = 0,
                 num_threads: int = 8, num_workers: int = 0, prefetch: int = 2):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(resize, int) or resize < size:
            raise ValueError(f"resize must be an int >= size={size}, got {resize!r}")
        if len(data.train) == 0 or len(data.test) == 0:
            raise ValueError(f"CUB data has {len(data.train)} training and {len(data.test)} "
                             "test images; both splits must be non-empty")
        self.data, self.size, self.resize, self.seed = data, size, resize, seed
        self.num_threads, self.num_workers, self.prefetch = num_threads, num_workers, prefetch
        self.source = data.source
        self.num_train, self.num_test = len(data.train), len(data.test)
        self.num_classes = len(data.class_ids)
        self.class_names = data.class_names
        self._train = _Examples(data.train, resize=resize, size=size, seed=seed)
        self._test = _Examples(data.test, resize=resize, size=size, seed=seed)
        self._iter = None  # (key, next_step, iterator) of the running training stream.

    def _grain_iter(self, dataset, batch: int) -> Iterator[dict[str, np.ndarray]]:
        import grain

        ds = dataset.batch(batch, batch_fn=_stack).to_iter_dataset(grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=self.prefetch * batch))
        if self.num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return iter(ds)

    def local_train_batches(self, start_step: int, batch_size: int,
                            rows: slice) -> Iterator[dict[str, np.ndarray]]:
        """This process's `rows` of the training batches of steps start_step, start_step + 1,
        ... as host arrays: {"image": uint8 (n, size, size, 3), "label": int32 (n,)}."""
        import grain

        n = rows.stop - rows.start
        # Element i is row rows.start + i % n of step start_step + i // n; "unbounded" length.
        items = grain.MapDataset.range(0, (1 << 40) * n).map(
            lambda i: (start_step + i // n, rows.start + i % n, batch_size)).map(
                self._train.train)
        return self._grain_iter(items, n)

    def train_batch(self, step: int, batch_size: int, *, sharding) -> dict[str, Any]:
        """The global training batch of `step` (pure in step), this process building its rows.

        Consecutive steps come from one grain stream decoding ahead; any other step restarts
        the stream there (same values).
        """
        rows = batching.local_rows(sharding, batch_size)
        key = (batch_size, rows.start, rows.stop)
        if self._iter is None or self._iter[0] != key or self._iter[1] != step:
            self._iter = [key, step, self.local_train_batches(step, batch_size, rows)]
        local = next(self._iter[2])
        self._iter[1] = step + 1
        return batching.assemble(local, sharding, batch_size)

    def local_test_batches(self, batch_size: int, rows: slice) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of the padded test batches (with "mask"), as host arrays."""
        import grain

        n = rows.stop - rows.start
        num_batches = -(-self.num_test // batch_size)

        def index(i):
            position = (i // n) * batch_size + rows.start + i % n
            return position if position < self.num_test else -1

        items = grain.MapDataset.range(0, num_batches * n).map(index).map(self._test.test)
        return self._grain_iter(items, n)

    def test_batches(self, batch_size: int, *, sharding) -> Iterator[dict[str, Any]]:
        """Global padded test batches (centre crops) with a "mask" leaf, the test set once."""
        rows = batching.local_rows(sharding, batch_size)
        for local in self.local_test_batches(batch_size, rows):
            yield batching.assemble(local, sharding, batch_size)

    def picture_examples(self, count: int) -> dict[str, np.ndarray]:
        """The first `count` test images (centre crops), labels and boxes (in crop pixels)."""
        count = min(count, self.num_test)
        items = [self._test.test(i) for i in range(count)]
        return {"image": np.stack([it["image"] for it in items]),
                "label": np.array([it["label"] for it in items], np.int32)}

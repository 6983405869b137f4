"""SVHN "format 1" (full house numbers): the official reader, a prepared cache and batches.

The official `train/`, `test/` and `extra/` folders (or `train.tar.gz` ... archives) hold
`1.png ...` and `digitStruct.mat`, a MATLAB v7.3 file (HDF5 with object references):

    /digitStruct/name  (N, 1) references to (n, 1) uint16 character codes ("1.png")
    /digitStruct/bbox  (N, 1) references to groups with label, left, top, width, height,
                       each (k, 1): float64 values inline when k = 1, references to (1, 1)
                       float64 datasets when k > 1. Label 10 is the digit 0.

Preparation (Goodfellow et al. 2014, as the paper [P]): the union of the digit boxes, clipped
to the image, is expanded by 30% about its centre (width and height each x1.3), cropped and
resized to 64x64 (not keeping the aspect ratio). The looser 128x128 framing [?: the paper gives
no recipe] is the same frame scaled by `LOOSE_FRAME_SCALE` = 2 about its centre and resized to
128x128: the digits have the 64-pixel framing's size in pixels, with twice the context around
them. A frame reaching past the image is filled by repeating the edge pixels (the geometry
stays exact). Boxes are in pixel-edge coordinates: a box covers [left, left + width) x
[top, top + height) with 0 the image's left/top edge [?: MATLAB's own convention is 1-based
pixel centres, half a pixel off; no reference implementation says more].

Labels are (N, 5) int32, one slot per digit from the left, 0-9 for a digit and `BLANK` = 10
for "no digit" after the number's end; numbers of more than 5 digits are dropped (counted in a
log line), and boxes past the image edge are clipped (counted).

The cache. The first use of a split prepares it once (decoding every PNG, in threads) into
`<cache_dir>/<split>_<count>_<size>/` as `images.npy` (uint8 (N, S, S, 3)) and `labels.npy`,
plus `meta.json` with the counts; later runs map `images.npy` (`np.load(mmap_mode="r")`) and
never decode a PNG again. Batches are a pure function of the step (`SvhnDataset`).

Example:
    >>> entries = read_digit_struct("/data/svhn/test/digitStruct.mat", limit=3)
    >>> entries[1].name, entries[1].digits
    ('2.png', (2, 1, 0))
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import tarfile
from typing import Any, BinaryIO, Iterator

from absl import logging
import numpy as np
from PIL import Image

from stn_jax.data import batching

SPLITS = ("train", "test", "extra")
MAX_DIGITS = 5  # [P] Numbers longer than this are dropped.
BLANK = 10  # The "no digit" class of a position.
NUM_CLASSES = 11
EXPAND = 0.3  # [P] The union of the boxes grows by 30% in x and in y.
LOOSE_FRAME_SCALE = 2.0  # [?] The 128x128 framing: the 64 one's frame, twice as large.
SIZES = (64, 128)
_BOX_FIELDS = ("label", "left", "top", "width", "height")
_CACHE_VERSION = 1  # Bump when the preparation changes: old caches are then prepared anew.


@dataclasses.dataclass(frozen=True)
class Entry:
    """One `digitStruct.mat` entry.

    Attributes:
        name: the image's file name, e.g. "1.png".
        digits: the digits from the left, 0-9 (the file's label 10 read as 0).
        boxes: (k, 4) float64 (left, top, width, height) per digit, pixels.
    """

    name: str
    digits: tuple[int, ...]
    boxes: np.ndarray


# ------------------------------------------------------------------------------ the reader


def _values(f, dataset, where: str) -> list[float]:
    """The k values of a (k, 1) bbox field: inline floats, or references to (1, 1) floats."""
    import h5py  # noqa: PLC0415 - only the SVHN reader needs h5py.

    raw = dataset[()]
    if dataset.dtype == h5py.ref_dtype or raw.dtype == object:
        out = []
        for ref in np.ravel(raw):
            value = np.asarray(f[ref][()])
            if value.size != 1:
                raise ValueError(f"{where}: a referenced value has shape {value.shape}, not (1, 1)")
            out.append(float(value.item()))
        return out
    return [float(v) for v in np.ravel(raw)]


def _open_h5(source: str | BinaryIO, where: str):
    import h5py  # noqa: PLC0415

    try:
        return h5py.File(source, "r")
    except OSError as e:
        raise ValueError(
            f"{where}: cannot be read as a MATLAB v7.3 (HDF5) file ({e}); a truncated or "
            "partial download? Fetch it again from the SVHN site") from e


def read_digit_struct(source: str | BinaryIO, *, limit: int = -1,
                      where: str | None = None) -> list[Entry]:
    """Reads the entries of a format-1 `digitStruct.mat`.

    Args:
        source: path of the file, or a binary file object holding it.
        limit: read only the first `limit` entries (-1: all).
        where: the name used in error messages (default: the path).

    Returns:
        The entries in file order.

    Raises:
        ValueError: the file is not readable HDF5 (e.g. truncated), lacks
            /digitStruct/name or /digitStruct/bbox, or an entry is malformed (names it: entry
            number, 1-based, and image name), e.g. has zero digits.

    Example:
        >>> [e.digits for e in read_digit_struct("test/digitStruct.mat", limit=2)]
        [(5,), (2, 1, 0)]
    """
    where = where or str(source)
    if not isinstance(limit, (int, np.integer)) or (limit != -1 and limit < 1):
        raise ValueError(f"limit must be -1 (all) or >= 1, got {limit!r}")
    with _open_h5(source, where) as f:
        try:
            names, bboxes = f["digitStruct/name"], f["digitStruct/bbox"]
        except KeyError as e:
            raise ValueError(
                f"{where}: no /digitStruct/name and /digitStruct/bbox: not an SVHN format-1 "
                "digitStruct.mat") from e
        count = names.shape[0]
        if bboxes.shape[0] != count:
            raise ValueError(f"{where}: {count} names but {bboxes.shape[0]} bbox entries")
        count = count if limit == -1 else min(count, int(limit))
        name_refs, bbox_refs = names[:count, 0], bboxes[:count, 0]
        entries = []
        for i in range(count):
            name = f"entry {i + 1}"
            try:
                name = "".join(chr(c) for c in np.ravel(f[name_refs[i]][()]))
                group = f[bbox_refs[i]]
                fields = {k: _values(f, group[k], f"{where}, entry {i + 1} ({name})")
                          for k in _BOX_FIELDS}
            except (KeyError, OSError, RuntimeError, TypeError) as e:
                raise ValueError(f"{where}, entry {i + 1} ({name}): cannot be read: {e}") from e
            sizes = {len(v) for v in fields.values()}
            if sizes == {0}:
                raise ValueError(f"{where}, entry {i + 1} ({name}): zero digits")
            if len(sizes) != 1:
                raise ValueError(f"{where}, entry {i + 1} ({name}): the bbox fields have "
                                 f"different lengths { {k: len(v) for k, v in fields.items()} }")
            labels = [int(round(v)) for v in fields["label"]]
            if any(not 1 <= v <= 10 for v in labels):
                raise ValueError(f"{where}, entry {i + 1} ({name}): labels {labels} outside 1-10")
            boxes = np.stack([fields[k] for k in ("left", "top", "width", "height")], -1)
            entries.append(Entry(name, tuple(v % 10 for v in labels), boxes))
    return entries


# -------------------------------------------------------------------------- crop arithmetic


def number_box(boxes: np.ndarray, image_wh: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The union of the digit boxes, clipped to the image.

    Args:
        boxes: (k, 4) (left, top, width, height), pixel edges.
        image_wh: (width, height) of the image.

    Returns:
        ((x0, y0, x1, y1) float64, whether clipping changed it).

    Example:
        >>> number_box(np.array([[99., 5, 14, 23], [121, 6, 12, 23]]), (182, 48))[0].tolist()
        [99.0, 5.0, 133.0, 29.0]
    """
    boxes = np.asarray(boxes, np.float64)
    x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
    x1, y1 = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
    raw = np.array([x0, y0, x1, y1])
    w, h = image_wh
    clipped = np.array([max(x0, 0.0), max(y0, 0.0), min(x1, w), min(y1, h)])
    return clipped, bool(np.any(clipped != raw))


def frame_box(union: np.ndarray, *, size: int) -> np.ndarray:
    """The crop frame (x0, y0, x1, y1) of a number box for the `size` framing (64 or 128).

    64: the box grown by `EXPAND` (30%) in width and height about its centre. 128: that frame
    scaled by `LOOSE_FRAME_SCALE` about the same centre.

    Example:
        >>> frame_box(np.array([10., 20, 30, 40]), size=64).tolist()  # 20x20 -> 26x26
        [7.0, 17.0, 33.0, 43.0]
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    x0, y0, x1, y1 = np.asarray(union, np.float64)
    grow = (1.0 + EXPAND) * (LOOSE_FRAME_SCALE if size == 128 else 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0) / 2 * grow, (y1 - y0) / 2 * grow
    return np.array([cx - hw, cy - hh, cx + hw, cy + hh])


def crop_resize(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Crops `box` (x0, y0, x1, y1, fractional pixel edges) and resizes it to size x size.

    Pillow's bilinear resize (antialiased when shrinking); a box past the image reads the
    repeated edge pixels.

    Args:
        image: (H, W, 3) uint8.
        box: (x0, y0, x1, y1) with x1 > x0, y1 > y0.
        size: output side.

    Returns:
        (size, size, 3) uint8.

    Example:
        >>> image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, -1)
        >>> crop_resize(image, np.array([1., 1, 3, 3]), 2)[..., 0].tolist()  # an exact copy
        [[5, 6], [9, 10]]
    """
    image = np.asarray(image)
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must have x1 > x0 and y1 > y0, got {tuple(box)}")
    h, w = image.shape[:2]
    pad = [max(0, int(np.ceil(-y0))), max(0, int(np.ceil(y1 - h))),
           max(0, int(np.ceil(-x0))), max(0, int(np.ceil(x1 - w)))]
    if any(pad):
        image = np.pad(image, ((pad[0], pad[1]), (pad[2], pad[3]), (0, 0)), mode="edge")
    picture = Image.fromarray(np.ascontiguousarray(image))
    box = (x0 + pad[2], y0 + pad[0], x1 + pad[2], y1 + pad[0])
    return np.asarray(picture.resize((size, size), Image.BILINEAR, box=box))


def encode_labels(digits: tuple[int, ...]) -> np.ndarray:
    """(5,) int32: the digits from the left, `BLANK` after the end.

    Example:
        >>> encode_labels((2, 1, 0)).tolist()
        [2, 1, 0, 10, 10]
    """
    if not 1 <= len(digits) <= MAX_DIGITS:
        raise ValueError(f"digits must have 1-{MAX_DIGITS} entries, got {digits}")
    return np.array(list(digits) + [BLANK] * (MAX_DIGITS - len(digits)), np.int32)


def decode_labels(labels: np.ndarray) -> str:
    """The string of a (5,) label row up to its first blank, e.g. [2, 1, 0, 10, 10] -> "210"."""
    out = []
    for v in np.asarray(labels).tolist():
        if v == BLANK:
            break
        out.append(str(v))
    return "".join(out)


# --------------------------------------------------------------------------- the prepared split


class _SplitFiles:
    """The images of a split: a folder, or the official `<split>.tar.gz` archive."""

    def __init__(self, data_dir: str, split: str):
        self.folder = os.path.join(data_dir, split)
        self.archive = os.path.join(data_dir, f"{split}.tar.gz")
        self.split = split
        if os.path.isfile(os.path.join(self.folder, "digitStruct.mat")):
            self.kind = "folder"
            self.where = os.path.join(self.folder, "digitStruct.mat")
        elif os.path.isfile(self.archive):
            self.kind = "archive"
            self.where = f"{self.archive}:{split}/digitStruct.mat"
        else:
            raise FileNotFoundError(
                f"SVHN format 1: neither {self.folder}/digitStruct.mat nor {self.archive} "
                f"exists (data.dir={data_dir!r}; expected the official train/, test/, extra/ "
                "folders or their .tar.gz archives)")

    def fingerprint(self) -> dict[str, Any]:
        path = self.where if self.kind == "folder" else self.archive
        stat = os.stat(path)
        return {"file": os.path.abspath(path), "bytes": stat.st_size,
                "mtime": int(stat.st_mtime)}

    def entries(self, limit: int) -> list[Entry]:
        if self.kind == "folder":
            return read_digit_struct(self.where, limit=limit)
        with tarfile.open(self.archive, "r:gz") as tar:
            for member in tar:
                if member.name.endswith(f"{self.split}/digitStruct.mat"):
                    data = io.BytesIO(tar.extractfile(member).read())
                    return read_digit_struct(data, limit=limit, where=self.where)
        raise ValueError(f"{self.archive}: has no {self.split}/digitStruct.mat member")

    def images(self, names: list[str], numbers: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (index into names, RGB uint8 image), in any order, for every name.

        Raises ValueError naming the first missing image (in the order of `names`) with its
        entry number in `numbers` (1-based)."""
        index = {n: numbers[i] - 1 for i, n in enumerate(names)}
        if self.kind == "folder":
            missing = [n for n in names if not os.path.isfile(os.path.join(self.folder, n))]
            if missing:
                raise ValueError(
                    f"{self.where}, entry {index[missing[0]] + 1} ({missing[0]}): the image "
                    f"{os.path.join(self.folder, missing[0])} is missing ({len(missing)} of "
                    f"{len(names)} missing; set data.limit to read only the first entries)")
            with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                paths = [os.path.join(self.folder, n) for n in names]
                # PNG decoding releases the GIL: threads use every core.
                yield from enumerate(pool.map(_decode_path, paths, chunksize=64))
            return
        seen, position = set(), {n: i for i, n in enumerate(names)}
        with tarfile.open(self.archive, "r:gz") as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if name in position and member.isfile() and name not in seen:
                    seen.add(name)
                    yield position[name], _decode_bytes(tar.extractfile(member).read(), member.name)
        missing = [n for n in names if n not in seen]
        if missing:
            raise ValueError(f"{self.where}, entry {index[missing[0]] + 1} ({missing[0]}): the "
                             f"image is missing from {self.archive} ({len(missing)} missing)")


def _decode_path(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{path}: cannot decode the image ({e})") from e


def _decode_bytes(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{where}: cannot decode the image ({e})") from e


@dataclasses.dataclass(frozen=True)
class PreparedSplit:
    """A prepared split. images: uint8 (N, S, S, 3) (a read-only memmap from the cache);
    labels: int32 (N, 5); meta: counts (kept, dropped_long, clipped) and the source."""

    images: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]


def default_cache_dir(data_dir: str) -> str:
    """`<data_dir>/stn_jax_cache` when that folder is writable, else ~/.cache/stn_jax/svhn."""
    here = os.path.join(data_dir, "stn_jax_cache")
    if os.access(here if os.path.isdir(here) else data_dir, os.W_OK):
        return here
    return os.path.join(os.path.expanduser("~"), ".cache", "stn_jax", "svhn")


def prepare_split(data_dir: str, split: str, *, size: int, limit: int = -1,
                  cache_dir: str = "") -> PreparedSplit:
    """The `size` framing of one split, prepared on first use and read from the cache after.

    Args:
        data_dir: folder with the official `train/`, `test/`, `extra/` (or `.tar.gz`).
        split: "train" | "test" | "extra".
        size: 64 or 128 (the framing).
        limit: use only the first `limit` entries of `digitStruct.mat` (-1: all).
        cache_dir: where prepared arrays go ("" = `default_cache_dir(data_dir)`).

    Returns:
        A `PreparedSplit`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    files = _SplitFiles(data_dir, split)
    cache_dir = cache_dir or default_cache_dir(data_dir)
    folder = os.path.join(cache_dir, f"{split}_{'all' if limit == -1 else limit}_{size}")
    wanted = {"version": _CACHE_VERSION, "source": files.fingerprint(), "size": size,
              "limit": limit}
    meta_path = os.path.join(folder, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as fh:
            meta = json.load(fh)
        if {k: meta.get(k) for k in wanted} == wanted:
            images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
            labels = np.load(os.path.join(folder, "labels.npy"))
            logging.info("SVHN %s (%d px): %d images from the cache %s", split, size,
                         len(labels), folder)
            return PreparedSplit(images, labels, meta)
        logging.info("SVHN %s: the cache %s is of another source or version; preparing anew",
                     split, folder)

    entries = files.entries(limit)
    numbers = [i + 1 for i, e in enumerate(entries) if len(e.digits) <= MAX_DIGITS]
    kept = [entries[n - 1] for n in numbers]
    dropped = len(entries) - len(kept)
    logging.info("SVHN %s: %d entries, %d kept, %d dropped (more than %d digits)", split,
                 len(entries), len(kept), dropped, MAX_DIGITS)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"images.npy.tmp{os.getpid()}")
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                       shape=(len(kept), size, size, 3))
    clipped = 0
    for done, (i, image) in enumerate(files.images([e.name for e in kept], numbers), 1):
        union, was_clipped = number_box(kept[i].boxes, (image.shape[1], image.shape[0]))
        if not (union[2] > union[0] and union[3] > union[1]):
            raise ValueError(f"{files.where}, entry {numbers[i]} ({kept[i].name}): the digit boxes "
                             f"lie outside the {image.shape[1]}x{image.shape[0]} image")
        clipped += was_clipped
        images[i] = crop_resize(image, frame_box(union, size=size), size)
        if done % 5000 == 0:
            logging.info("SVHN %s: prepared %d / %d images", split, done, len(kept))
    images.flush()
    del images
    labels = np.stack([encode_labels(e.digits) for e in kept]) if kept else np.zeros(
        (0, MAX_DIGITS), np.int32)
    logging.info("SVHN %s: %d of %d numbers had boxes past the image edge, clipped", split,
                 clipped, len(kept))
    np.save(os.path.join(folder, "labels.npy"), labels)
    os.replace(tmp, os.path.join(folder, "images.npy"))
    meta = {**wanted, "entries": len(entries), "kept": len(kept), "dropped_long": dropped,
            "clipped": clipped}
    with open(meta_path + ".tmp", "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(meta_path + ".tmp", meta_path)  # Written last: its presence means complete.
    return PreparedSplit(np.load(os.path.join(folder, "images.npy"), mmap_mode="r"), labels,
                         meta)


# ------------------------------------------------------------------------------- batches


def crop_offsets(key_seed: tuple[int, ...], n: int, room: int) -> np.ndarray:
    """(n, 2) uniform integer (x, y) crop offsets in [0, room], a pure function of key_seed."""
    return np.random.default_rng(list(key_seed)).integers(0, room + 1, size=(n, 2))


def crop_batch(images: np.ndarray, offsets: np.ndarray | None, crop: int) -> np.ndarray:
    """Crops crop x crop windows at (x, y) offsets (None: the centre) from (N, S, S, C) images.

    Example:
        >>> images = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1)
        >>> crop_batch(images, np.array([[0, 0], [2, 1]]), 2)[1, ..., 0].tolist()
        [[22, 23], [26, 27]]
    """
    n, s = images.shape[:2]
    if crop == s:
        return images
    if offsets is None:
        offsets = np.full((n, 2), (s - crop) // 2)
    out = np.empty((n, crop, crop) + images.shape[3:], images.dtype)
    for i, (x, y) in enumerate(offsets):
        out[i] = images[i, y:y + crop, x:x + crop]
    return out


class SvhnDataset:
    """SVHN format 1 for the training loop (the `stn_jax.tasks.base.Dataset` protocol).

    The training set is train (+ extra when `use_extra`) less `num_validation` images drawn
    once (seed 0) as the validation set; `eval_split` picks what `test_batches` covers ("test"
    or "validation"). Batches are float32 (B, S', S', 3) in [0, 1] with labels (B, 5) int32;
    S' = `crop` (random crops in training when `random_crop`, centre crops otherwise) or the
    framing size when `crop` is 0.

    Example:
        >>> ds = SvhnDataset("/data/svhn", size=64, seed=0)
        >>> ds.train_batch(0, 128, sharding=sharding)["label"].shape
        (128, 5)
    """

    source = "svhn_format1"

    def __init__(self, data_dir: str, *, size: int, seed: int, use_extra: bool = False,
                 num_validation: int = 5000, eval_split: str = "test", crop: int = 0,
                 random_crop: bool = False, limit: int = -1, cache_dir: str = ""):
        if eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split must be 'test' or 'validation', got {eval_split!r}")
        if crop and not 0 < crop <= size:
            raise ValueError(f"crop must be 0 (none) or in [1, {size}], got {crop}")
        parts = [prepare_split(data_dir, "train", size=size, limit=limit, cache_dir=cache_dir)]
        if use_extra:
            parts.append(prepare_split(data_dir, "extra", size=size, limit=limit,
                                       cache_dir=cache_dir))
        self._parts = [p.images for p in parts]
        # Rows of the training pool: (part, row) pairs in one table.
        table = np.concatenate([np.stack([np.full(len(p.labels), k), np.arange(len(p.labels))],
                                         -1) for k, p in enumerate(parts)])
        labels = np.concatenate([p.labels for p in parts])
        if not 0 <= num_validation < len(labels):
            raise ValueError(f"num_validation={num_validation} must be in [0, {len(labels)}) "
                             f"(the training pool has {len(labels)} images)")
        order = np.random.default_rng(0).permutation(len(labels))
        val, train = np.sort(order[:num_validation]), np.sort(order[num_validation:])
        self._train_rows, self._train_labels = table[train], labels[train]
        if eval_split == "test":
            test = prepare_split(data_dir, "test", size=size, limit=limit, cache_dir=cache_dir)
            self._eval_parts, self._eval_rows = [test.images], np.stack(
                [np.zeros(len(test.labels), int), np.arange(len(test.labels))], -1)
            self._eval_labels = test.labels
        else:
            self._eval_parts, self._eval_rows, self._eval_labels = (
                self._parts, table[val], labels[val])
        self.size, self.crop = size, crop or size
        self.random_crop = random_crop
        self.image_shape = (self.crop, self.crop, 3)
        self.num_train, self.num_test = len(train), len(self._eval_labels)
        self._seed = seed
        logging.info("SVHN: %d training images, %d %s images, %s px input", self.num_train,
                     self.num_test, eval_split, self.image_shape)

    @staticmethod
    def _gather(parts, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows),) + parts[0].shape[1:], np.uint8)
        for k, part in enumerate(parts):
            here = rows[:, 0] == k
            if here.any():
                # Sorted reads of a memmap touch each page once.
                order = np.argsort(rows[here, 1])
                block = np.asarray(part[rows[here, 1][order]])
                out[np.flatnonzero(here)[order]] = block
        return out

    def train_indices(self, step: int, batch_size: int) -> np.ndarray:
        """Training rows of the batch of `step`: epochs of seeded permutations, as MNIST's."""
        positions = int(step) * batch_size + np.arange(batch_size)
        epochs = positions // self.num_train
        index = np.empty(batch_size, np.int64)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([self._seed, 1, int(epoch)]).permutation(self.num_train)
            here = epochs == epoch
            index[here] = perm[positions[here] % self.num_train]
        return index

    def local_train_batch(self, step: int, batch_size: int, rows: slice) -> dict[str, np.ndarray]:
        """Host arrays of rows `rows` of the global batch of `step`."""
        index = self.train_indices(step, batch_size)[rows]
        images = self._gather(self._parts, self._train_rows[index])
        offsets = None
        if self.random_crop and self.crop < self.size:
            offsets = crop_offsets((self._seed, 2, int(step)), batch_size,
                                   self.size - self.crop)[rows]
        images = crop_batch(images, offsets, self.crop)
        return {"image": images.astype(np.float32) / 255.0, "label": self._train_labels[index]}

    def train_batch(self, step: int, batch_size: int, *, sharding) -> dict[str, Any]:
        rows = batching.local_rows(sharding, batch_size)
        return batching.assemble(self.local_train_batch(step, batch_size, rows), sharding,
                                 batch_size)

    def _eval_examples(self, index: np.ndarray) -> dict[str, np.ndarray]:
        images = crop_batch(self._gather(self._eval_parts, self._eval_rows[index]), None,
                            self.crop)
        return {"image": images.astype(np.float32) / 255.0, "label": self._eval_labels[index]}

    def test_batches(self, batch_size: int, *, sharding) -> Iterator[dict[str, Any]]:
        rows = batching.local_rows(sharding, batch_size)
        for start in range(0, self.num_test, batch_size):
            index = np.arange(start, min(start + batch_size, self.num_test))
            padded = batching.pad_batch(self._eval_examples(index), batch_size)
            yield batching.assemble({k: v[rows] for k, v in padded.items()}, sharding,
                                    batch_size)

    def picture_examples(self, count: int) -> dict[str, np.ndarray]:
        return self._eval_examples(np.arange(min(count, self.num_test)))

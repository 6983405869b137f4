"""MNIST sources: TFDS, a directory of IDX files, or the small set bundled with stn_jax.

`load_mnist` returns plain uint8 arrays; the distortions and batching live in
`stn_jax.data.distortions` and `stn_jax.data.pipeline`.

Sources (the `source` argument):

- ``"tfds"``: the TFDS ``mnist`` dataset (60k train / 10k test). TensorFlow is not needed
  to *read* a dataset prepared in the ``array_record`` format (``tfds.data_source``); reading
  the default ``tfrecord`` format or downloading and preparing MNIST does need TensorFlow
  (the TFDS MNIST builder reads its files with ``tf.io.gfile``). Without it the error says
  what to install.
- ``"idx"``: a directory with the four standard IDX files, gzipped or not.
- ``"bundled"``: 5,000 real MNIST training digits (500 per class) shipped in
  ``stn_jax/data/mnist_bundled.npz`` (see ``scripts/make_bundled_mnist.py`` for provenance
  and licence), split by a seeded, stratified draw. Good for tests and quick runs;
  results on it are NOT comparable with the paper's.
- ``"auto"``: TFDS when it is prepared or can be downloaded quickly, else ``"bundled"``,
  with one loud warning. Where MNIST is not prepared and TensorFlow is not installed, TFDS is
  not even imported (a second saved, and none of its warnings).

How to prepare TFDS MNIST for this project: README.md, section "MNIST data".
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import importlib.resources
import importlib.util
import os
import shutil
import socket
import tempfile
import threading
from typing import Iterator
import zlib

from absl import logging
import numpy as np

SOURCES = ("auto", "tfds", "idx", "bundled")

BUNDLED_FILE = "mnist_bundled.npz"
# SHA-256 of stn_jax/data/mnist_bundled.npz as written by scripts/make_bundled_mnist.py.
BUNDLED_SHA256 = "e847095b634e273f6cea162f5d04ff2f9985056a6d0372812ea7a0747a07212d"

# Standard IDX file names -> (magic, size in bytes of the uncompressed standard MNIST file).
IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte", 0x00000803, 16 + 60000 * 28 * 28),
    "train_labels": ("train-labels-idx1-ubyte", 0x00000801, 8 + 60000),
    "test_images": ("t10k-images-idx3-ubyte", 0x00000803, 16 + 10000 * 28 * 28),
    "test_labels": ("t10k-labels-idx1-ubyte", 0x00000801, 8 + 10000),
}

# Where TFDS downloads MNIST from; the `auto` probe only checks that this host answers.
_TFDS_HOST = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 3.0


@dataclasses.dataclass(frozen=True)
class MnistArrays:
    """MNIST as arrays.

    Attributes:
      train_images: uint8 (N, 28, 28), 0 = background.
      train_labels: int32 (N,), in [0, 9].
      test_images: uint8 (M, 28, 28).
      test_labels: int32 (M,).
      source: which source was used: "tfds", "idx" or "bundled".
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    def __post_init__(self):
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
                raise ValueError(
                    f"{split}_images: expected uint8 (N, 28, 28), got {images.dtype} {images.shape}"
                )
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels: expected int32 ({images.shape[0]},), got {labels.dtype} "
                    f"{labels.shape}"
                )


class TfdsUnavailableError(RuntimeError):
    """TFDS MNIST cannot be read here (not prepared, no TensorFlow, no network...)."""


def load_mnist(
    *,
    source: str = "auto",
    tfds_dir: str = "",
    idx_dir: str = "",
    bundled_test_fraction: float = 0.2,
    split_seed: int = 0,
) -> MnistArrays:
    """Loads MNIST from the chosen source.

    Args:
      source: "auto", "tfds", "idx" or "bundled" (see the module docstring).
      tfds_dir: TFDS data_dir; "" means the TFDS default (TFDS_DATA_DIR or
        ~/tensorflow_datasets).
      idx_dir: directory holding the four IDX files (source="idx").
      bundled_test_fraction: share of each class held out as the bundled test set.
      split_seed: seed of the bundled train/test split.

    Returns:
      MnistArrays; its `source` says which source was actually used.

    Example:
      >>> mnist = load_mnist(source="bundled")
      >>> mnist.train_images.shape, mnist.test_images.shape
      ((4000, 28, 28), (1000, 28, 28))
    """
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    if source == "tfds":
        return load_tfds(tfds_dir=tfds_dir, download=True)
    if source == "idx":
        if not idx_dir:
            raise ValueError("idx_dir: source='idx' needs the directory of the IDX files")
        return load_idx(idx_dir)
    if source == "bundled":
        return load_bundled(test_fraction=bundled_test_fraction, split_seed=split_seed)
    return _load_auto(
        tfds_dir=tfds_dir, bundled_test_fraction=bundled_test_fraction, split_seed=split_seed
    )


# ----------------------------------------------------------------------------- auto


def _load_auto(*, tfds_dir: str, bundled_test_fraction: float, split_seed: int) -> MnistArrays:
    reason = ""
    try:
        if _tfds_on_disk(tfds_dir) and tfds_prepared(tfds_dir):
            return load_tfds(tfds_dir=tfds_dir, download=False)
        reason = tfds_download_blocker()
        if not reason:
            return load_tfds(tfds_dir=tfds_dir, download=True)
    except TfdsUnavailableError as e:
        reason = str(e)
    banner = "!" * 78
    logging.warning(
        "\n%s\nMNIST source 'auto': TFDS mnist is not available (%s).\n"
        "USING THE BUNDLED 5,000-DIGIT MNIST SUBSET (train %d%% / test %d%% of it).\n"
        "Results on it are NOT comparable with the paper (60k train / 10k test).\n"
        "For the real data set: prepare TFDS mnist once (needs tensorflow and internet; see "
        "the README, 'MNIST data'), or use source='idx' with idx_dir=<dir of the 4 IDX "
        "files>.\n%s",
        banner,
        reason,
        round(100 * (1 - bundled_test_fraction)),
        round(100 * bundled_test_fraction),
        banner,
    )
    return load_bundled(test_fraction=bundled_test_fraction, split_seed=split_seed)


def tfds_download_blocker(*, timeout_s: float = _PROBE_TIMEOUT_S) -> str:
    """Why TFDS mnist cannot be downloaded and prepared here; "" if it probably can.

    Cheap: checks that TensorFlow is importable (the TFDS MNIST builder needs it) and that
    the download host accepts a TCP connection within `timeout_s` (DNS included, run in a
    daemon thread so a hanging resolver cannot block).
    """
    if importlib.util.find_spec("tensorflow_datasets") is None:
        return "tensorflow-datasets is not installed"
    if importlib.util.find_spec("tensorflow") is None:
        return "tensorflow is not installed, and the TFDS MNIST builder needs it to prepare"
    result = []

    def probe():
        try:
            socket.create_connection(_TFDS_HOST, timeout=timeout_s).close()
            result.append("")
        except OSError as e:
            result.append(f"cannot reach {_TFDS_HOST[0]}: {e}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if not result:
        return f"no answer from {_TFDS_HOST[0]} within {timeout_s:.0f} s"
    return result[0]


# ----------------------------------------------------------------------------- tfds


def _tfds_data_dir(tfds_dir: str) -> str:
    """The TFDS data_dir that `tfds_dir` means ("" = TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    return os.path.expanduser(
        tfds_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _tfds_on_disk(tfds_dir: str) -> bool:
    """Whether some version of TFDS mnist has been prepared under `tfds_dir` (no TFDS import)."""
    return bool(glob.glob(os.path.join(_tfds_data_dir(tfds_dir), "mnist", "*",
                                       "dataset_info.json")))


@contextlib.contextmanager
def _tfds_builder_quiet() -> Iterator[None]:
    """Around `tfds.builder` and `is_prepared`: their warnings and temporary folders stay in.

    Where MNIST is not prepared, `is_prepared` warns "Variant folder ... has no
    dataset_info.json" about a folder that does not exist, and making the builder leaves an empty
    `/tmp/tmp*tfds` folder (`DatasetInfo.initialize_from_bucket`) that nothing removes. Neither
    says anything a user can act on: whether MNIST is prepared is what `load_tfds` reports.
    """
    verbosity = logging.get_verbosity()
    logging.set_verbosity(min(verbosity, logging.ERROR))  # absl: lower is quieter.
    previous = tempfile.tempdir
    private = tempfile.mkdtemp(prefix="stn_jax_tfds_")
    tempfile.tempdir = private
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(private, ignore_errors=True)
        logging.set_verbosity(verbosity)


def _tfds_builder(tfds_dir: str):
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise TfdsUnavailableError(
            "tensorflow-datasets is not installed (pip install tensorflow-datasets)"
        ) from e
    with _tfds_builder_quiet():
        return tfds.builder("mnist", data_dir=tfds_dir or None)


def tfds_prepared(tfds_dir: str = "") -> bool:
    """Whether TFDS mnist is already prepared under `tfds_dir` (filesystem check only)."""
    return _is_prepared(_tfds_builder(tfds_dir))


def _is_prepared(builder) -> bool:
    with _tfds_builder_quiet():
        return builder.is_prepared()


def load_tfds(*, tfds_dir: str = "", download: bool = True) -> MnistArrays:
    """Loads TFDS mnist, preparing it first when needed and `download` is set.

    Raises:
      TfdsUnavailableError: not prepared and download off, or TensorFlow missing where TFDS
        needs it (preparing MNIST; reading the tfrecord format). The message says what to do.
    """
    builder = _tfds_builder(tfds_dir)
    have_tf = importlib.util.find_spec("tensorflow") is not None
    if not _is_prepared(builder):
        if not download:
            raise TfdsUnavailableError(f"TFDS mnist is not prepared in {builder.data_dir}")
        if not have_tf:
            raise TfdsUnavailableError(
                "TFDS mnist is not prepared and preparing it needs TensorFlow: "
                "pip install tensorflow-cpu (or use source='idx' or 'bundled')"
            )
        logging.info("Downloading and preparing TFDS mnist into %s", builder.data_dir)
        builder.download_and_prepare(file_format="array_record")
    formats = _tfds_file_formats(builder)
    if "array_record" in formats:
        arrays = {split: _read_tfds_data_source(builder, split) for split in ("train", "test")}
    elif have_tf:
        arrays = {split: _read_tfds_tf(builder, split) for split in ("train", "test")}
    else:
        raise TfdsUnavailableError(
            f"TFDS mnist in {builder.data_dir} is in {sorted(formats)} format; reading it needs "
            "TensorFlow (pip install tensorflow-cpu), or re-prepare it TF-free readable with "
            "builder.download_and_prepare(file_format='array_record')"
        )
    logging.info("MNIST source: tfds (%s)", builder.data_dir)
    return MnistArrays(
        train_images=arrays["train"][0],
        train_labels=arrays["train"][1],
        test_images=arrays["test"][0],
        test_labels=arrays["test"][1],
        source="tfds",
    )


def _tfds_file_formats(builder) -> set[str]:
    """File formats ("tfrecord", "array_record", ...) a prepared TFDS dataset is stored in."""
    info = builder.info
    formats = {str(getattr(f, "value", f)) for f in info.available_file_formats()}
    formats.add(str(getattr(info.file_format, "value", info.file_format)))
    return formats


def _read_tfds_data_source(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a split through the TF-free random-access data source."""
    source = builder.as_data_source(split=split, file_format="array_record")
    n = len(source)
    images = np.empty((n, 28, 28), np.uint8)
    labels = np.empty((n,), np.int32)
    for k in range(n):
        record = source[k]
        images[k] = np.asarray(record["image"]).reshape(28, 28)
        labels[k] = int(record["label"])
    return images, labels


def _read_tfds_tf(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images = np.asarray(data["image"], np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(data["label"], np.int32)


# ----------------------------------------------------------------------------- idx


def _find_idx_file(idx_dir: str, name: str, expected_size: int) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(idx_dir, candidate)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"idx_dir: missing IDX file {name} (or {name}.gz) in {idx_dir!r}; standard MNIST "
        f"has it at {expected_size:,} bytes uncompressed"
    )


def _read_bytes(path: str) -> bytes:
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"IDX file {path}: not a readable gzip file ({e})") from e


def read_idx(path: str, *, magic: int, standard_size: int) -> np.ndarray:
    """Reads one unsigned-byte IDX file (optionally gzipped) into a uint8 array.

    Args:
      path: the file; names ending in ".gz" are decompressed.
      magic: expected magic number: 0x00000803 (images, 3 dims) or 0x00000801 (labels).
      standard_size: size of the standard MNIST file, quoted in errors.

    Returns:
      uint8 array with the shape stored in the header.

    Raises:
      ValueError: wrong magic, truncated header or data; names the file and the size expected.
    """
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = data[:4].hex() if len(data) >= 4 else f"only {len(data)} bytes"
        raise ValueError(
            f"IDX file {path}: expected magic 0x{magic:08x} ({ndim}-d unsigned bytes), found "
            f"{found}; standard MNIST has this file at {standard_size:,} bytes"
        )
    if len(data) < header_size:
        raise ValueError(
            f"IDX file {path}: truncated header, {len(data)} bytes, expected at least "
            f"{header_size} bytes (standard MNIST: {standard_size:,} bytes)"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_size + int(np.prod(shape))
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "too long"
        raise ValueError(
            f"IDX file {path}: {kind}, {len(data):,} bytes, expected {expected:,} bytes for "
            f"shape {shape} (standard MNIST: {standard_size:,} bytes)"
        )
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape).copy()


def load_idx(idx_dir: str) -> MnistArrays:
    """Loads MNIST from the four standard IDX files in `idx_dir` (each may be gzipped).

    Example:
      >>> mnist = load_idx("/data/mnist")  # train-images-idx3-ubyte.gz, ...
    """
    arrays = {}
    for key, (name, magic, standard_size) in IDX_FILES.items():
        path = _find_idx_file(idx_dir, name, standard_size)
        arrays[key] = read_idx(path, magic=magic, standard_size=standard_size)
        arrays[key + "_path"] = path
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (28, 28):
            raise ValueError(
                f"IDX file {arrays[split + '_images_path']}: expected 28x28 images, got "
                f"{images.shape[1:]}"
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"IDX files {arrays[split + '_images_path']} and {arrays[split + '_labels_path']}: "
                f"{images.shape[0]} images but {labels.shape[0]} labels"
            )
        if labels.size and labels.max() > 9:
            raise ValueError(
                f"IDX file {arrays[split + '_labels_path']}: labels must be in [0, 9], found "
                f"{labels.max()}"
            )
    logging.info("MNIST source: idx (%s)", idx_dir)
    return MnistArrays(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int32),
        source="idx",
    )


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file (gzipped when `path` ends in ".gz").

    The inverse of `read_idx`; used by tests and to export data.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise ValueError(f"array: expected uint8 with 1 or 3 dims, got {array.dtype} {array.shape}")
    header = (0x800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


# ----------------------------------------------------------------------------- bundled


def bundled_path() -> str:
    """Path of the bundled npz inside the installed package."""
    return str(importlib.resources.files("stn_jax.data") / BUNDLED_FILE)


def read_bundled() -> tuple[np.ndarray, np.ndarray]:
    """Reads the bundled digits after checking the file's SHA-256.

    Returns:
      images uint8 (5000, 28, 28) and labels int32 (5000,), 500 per class.

    Raises:
      ValueError: the file's checksum differs from BUNDLED_SHA256.
    """
    path = bundled_path()
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BUNDLED_SHA256:
        raise ValueError(
            f"bundled MNIST {path}: SHA-256 {digest} != expected {BUNDLED_SHA256}; the file is "
            "damaged or was changed (rebuild it with scripts/make_bundled_mnist.py)"
        )
    with np.load(path) as data:
        return data["images"], data["labels"].astype(np.int32)


def stratified_split(
    labels: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split of example indices into train and test.

    Each class gives round(test_fraction * its count) examples to test.

    Args:
      labels: int (N,).
      test_fraction: in (0, 1).
      seed: numpy Generator seed.

    Returns:
      (train_indices, test_indices), each sorted int64, disjoint, together all of range(N).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: round(test_fraction * members.size)])
    test_indices = np.sort(np.concatenate(test))
    train_indices = np.setdiff1d(np.arange(labels.shape[0]), test_indices)
    return train_indices, test_indices


def load_bundled(*, test_fraction: float = 0.2, split_seed: int = 0) -> MnistArrays:
    """The bundled 5,000 MNIST digits, split train/test by a seeded stratified draw.

    Example:
      >>> mnist = load_bundled(test_fraction=0.2)
      >>> np.bincount(mnist.test_labels).tolist()
      [100, 100, 100, 100, 100, 100, 100, 100, 100, 100]
    """
    images, labels = read_bundled()
    train, test = stratified_split(labels, test_fraction=test_fraction, seed=split_seed)
    logging.info(
        "MNIST source: bundled (%d train / %d test digits, split_seed=%d)",
        train.size,
        test.size,
        split_seed,
    )
    return MnistArrays(
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
        source="bundled",
    )

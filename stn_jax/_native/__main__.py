"""Builds the native kernels ahead of time: ``python -m stn_jax._native [--force]``."""

import sys

from stn_jax import _native

if __name__ == "__main__":
    try:
        path = _native.build(force="--force" in sys.argv[1:])
    except RuntimeError as err:
        print(f"stn_jax native kernels: build failed: {err}", file=sys.stderr)
        sys.exit(1)
    print(path)
    if not _native.load():
        print(f"stn_jax native kernels: load failed: {_native.error()}", file=sys.stderr)
        sys.exit(1)

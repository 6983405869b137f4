"""Optional native CPU kernels of the bilinear sampler, called through the XLA FFI (jax.ffi).

The C++ source (``bilinear.cc`` beside this file) is compiled on first use with the system C++
compiler against the FFI headers of the installed jaxlib (``jax.ffi.include_dir()``), cached,
loaded with ctypes and registered as two FFI targets for the CPU platform. Nothing is built at
install time, so ``pip install -e .`` needs no compiler; without one (or when the build fails)
:func:`available` returns False, :func:`error` says why, and the samplers use the pure-JAX path.

The cached library lives in ``$STN_JAX_NATIVE_CACHE_DIR`` or ``~/.cache/stn_jax/native``
(``$XDG_CACHE_HOME`` is honoured), under a key that hashes the source, the compiler and its
flags, the jaxlib version and this CPU's feature flags (the build uses ``-march=native``), so a
stale or foreign build is never loaded. ``STN_JAX_NATIVE=0`` disables the native path;
``CXX`` picks the compiler (default ``g++``). ``python -m stn_jax._native`` builds it ahead of
time and prints where it is. ``STN_JAX_NATIVE_LINGER_US`` (default 100, read once per process)
is how long a pool thread that helped with one call spins waiting for the next before it goes
back to the pool; 0 turns that off (see ``docs/performance.md``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile
import threading

from absl import logging

__all__ = ["FORWARD_TARGET", "BACKWARD_TARGET", "available", "build", "error", "library",
           "load"]

FORWARD_TARGET = "stn_jax_bilinear_forward"
BACKWARD_TARGET = "stn_jax_bilinear_backward"

_SOURCE = pathlib.Path(__file__).with_name("bilinear.cc")
# -ffp-contract=off: no FMA contraction, so every coordinate is rounded exactly as XLA rounds the
# pure-JAX reference and both paths pick the same taps at integer coordinates.
# -fno-trapping-math lets float -> int conversions vectorise (no code here reads FP exception
# flags; no result changes); -fopenmp-simd honours the `omp simd` loops (no OpenMP runtime).
_FLAGS = (
    "-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd",
    "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w",
)
_BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "path": None}


def _disabled() -> bool:
    return os.environ.get("STN_JAX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _cache_dir() -> pathlib.Path:
    if os.environ.get("STN_JAX_NATIVE_CACHE_DIR"):
        return pathlib.Path(os.environ["STN_JAX_NATIVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "stn_jax" / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "g++"))


def _library_path() -> pathlib.Path:
    import jax
    import jaxlib

    include = jax.ffi.include_dir()
    try:
        version = subprocess.run(_compiler() + ["--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"no C++ compiler {_compiler()!r}: {err}") from err
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_compiler() + list(_FLAGS)).encode(),
                 version.encode(), jaxlib.__version__.encode(), include.encode(),
                 _cpu_flags().encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_dir() / f"libstn_jax_native-{key.hexdigest()[:20]}.so"


def build(*, force: bool = False) -> pathlib.Path:
    """Compiles the kernels if no matching cached build exists; returns the library's path.

    Raises:
      RuntimeError: no compiler, or the compilation failed (its output is in the message).
    """
    import jax

    path = _library_path()
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: concurrent builds (parallel test processes) never
    # load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = _compiler() + list(_FLAGS) + ["-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
    logging.info("stn_jax: compiling the native sampler kernels (once per machine, some "
                 "seconds) into %s", path)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as err:
        os.unlink(tmp)
        raise RuntimeError(f"could not run {shlex.join(cmd)}: {err}") from err
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{result.stdout}{result.stderr}")
    os.replace(tmp, path)
    return path


def load() -> bool:
    """Builds (if needed), loads and registers the FFI targets once; True if they are usable."""
    with _lock:
        if _state["loaded"]:
            return True
        if _state["error"] is not None:
            return False
        if _disabled():
            _state["error"] = "disabled by STN_JAX_NATIVE=0"
            return False
        try:
            import jax

            path = build()
            lib = ctypes.cdll.LoadLibrary(str(path))
            jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(lib.StnBilinearForward),
                                        platform="cpu")
            jax.ffi.register_ffi_target(BACKWARD_TARGET,
                                        jax.ffi.pycapsule(lib.StnBilinearBackward), platform="cpu")
        except Exception as err:  # noqa: BLE001 - any failure means: use the pure-JAX path
            _state["error"] = f"{type(err).__name__}: {err}"
            return False
        _state["loaded"] = True
        _state["path"] = str(path)
        return True


def available() -> bool:
    """True if the native kernels are (or can be) built and registered; builds on first call."""
    return load()


def library() -> str | None:
    """The path of the loaded library, or None."""
    return _state["path"]


def error() -> str | None:
    """Why the native kernels are unavailable, or None."""
    return _state["error"]

"""Suite-wide checks.

In CI (the environment variable CI=true) the native CPU kernel must build: without it every
native test would skip and every method="auto" case would run the gather path a second time,
so a broken build would pass unseen. There the run stops at once, with the build's error.
Elsewhere (a machine without a C++ compiler) the native tests skip with that error as reason.

Compile effort: the tests compile hundreds of small programs and run most of them a few times,
so XLA's compile time dominates the suite. Every test therefore compiles with
`jax_disable_most_optimizations` (XLA's backend at -O0, no expensive LLVM passes), which took
the model tests (tests/test_models_{svhn,cub,mnist}.py, -n 2) from 120 to 73 s. Tests marked
`full_xla` (trainings of a hundred steps or more, where run time dominates) compile as users'
runs do. Subprocesses the tests start inherit
the setting through the environment. `JAX_DISABLE_MOST_OPTIMIZATIONS=0 pytest ...` compiles
everything fully.
"""

import os

import pytest

# Before jax is imported anywhere, so that subprocesses inherit it too; a value the user set wins.
_EFFORT = os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
FAST_COMPILE = _EFFORT.strip().lower() not in ("0", "false", "no", "off")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "full_xla: compile with XLA's full optimisations (a training that runs long "
        "enough for run time to outweigh compile time); see tests/conftest.py")


@pytest.fixture
def fast_compile() -> bool:
    """Whether unmarked tests compile with XLA's cheapest settings in this run."""
    return FAST_COMPILE


@pytest.fixture(autouse=True)
def _xla_compile_effort(request):
    import jax

    full = request.node.get_closest_marker("full_xla") is not None
    jax.config.update("jax_disable_most_optimizations", FAST_COMPILE and not full)
    yield


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def pytest_report_header(config):
    from stn_jax import _native

    if _native.available():
        return "stn_jax native kernels: available"
    return f"stn_jax native kernels: UNAVAILABLE ({_native.error()})"


def pytest_sessionstart(session):
    if not _in_ci():
        return
    from stn_jax import _native

    if os.environ.get("STN_JAX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise pytest.UsageError("CI=true with STN_JAX_NATIVE=0: the native tests would not run")
    if not _native.available():
        raise pytest.UsageError(
            f"CI=true and the native kernels do not build or load: {_native.error()}"
        )

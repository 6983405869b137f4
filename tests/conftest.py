"""Suite-wide checks.

In CI (the environment variable CI=true) the native CPU kernel must build: without it every
native test would skip and every method="auto" case would run the gather path a second time,
so a broken build would pass unseen. There the run stops at once, with the build's error.
Elsewhere (a machine without a C++ compiler) the native tests skip with that error as reason.
"""

import os

import pytest


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

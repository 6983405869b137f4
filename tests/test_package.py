"""The core is importable with jax and numpy alone; the public names are there."""

import subprocess
import sys

import pytest

import stn_jax


def test_core_import_pulls_in_no_flax_optax_or_tfds():
    code = (
        "import sys, stn_jax, stn_jax.grids, stn_jax.sampling\n"
        "heavy = sorted(m for m in ('flax', 'optax', 'orbax', 'tensorflow_datasets', 'torch') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names():
    for name in stn_jax.__all__:
        assert getattr(stn_jax, name) is not None
    assert stn_jax.SpatialTransformer.__module__ == "stn_jax.transformer"


def test_unmarked_tests_compile_cheaply(fast_compile):
    # tests/conftest.py: XLA's cheapest compiles for the suite, unless the user asked otherwise.
    import jax

    if not fast_compile:
        pytest.skip("JAX_DISABLE_MOST_OPTIMIZATIONS=0: the user asked for full compiles")
    assert jax.config.read("jax_disable_most_optimizations") is True


@pytest.mark.full_xla
def test_full_xla_tests_compile_as_users_runs_do():
    import jax

    assert jax.config.read("jax_disable_most_optimizations") is False

"""Tests of the fast paths of bilinear_sample (stn_jax/_fast_paths.py, stn_jax/_native/) against
the pure-JAX reference (method="gather"): values and both gradients in every padding mode, with
both align_corners, non-finite points, float64, vmap, grad of grad and the automatic choice."""

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stn_jax
from stn_jax import _fast_paths, _native

MODES = ("zeros", "border", "reflection")
CASES = list(itertools.product(MODES, (False, True)))

# In CI (CI=true) these run even without the kernels, and fail: tests/conftest.py also stops a
# CI run whose native build fails, so method="auto" is never silently a second gather run.
needs_native = pytest.mark.skipif(
    not _native.available() and os.environ.get("CI", "").lower() != "true",
    reason=f"native kernels unavailable: {_native.error()}",
)


@functools.partial(jax.jit, static_argnames=("method", "padding_mode", "align_corners"))
def _sample_and_grads(image, grid, cotangent, *, method, padding_mode="zeros", align_corners=False):
    def f(i, g):
        return stn_jax.bilinear_sample(i, g, method=method, padding_mode=padding_mode,
                                       align_corners=align_corners)

    out, vjp = jax.vjp(f, image, grid)
    return (out,) + vjp(cotangent)


def _assert_same_as_gather(method, image, grid, rtol=2e-5, atol=2e-5, **kwargs):
    cot = jax.random.normal(jax.random.key(9), grid.shape[:-1] + image.shape[-1:], image.dtype)
    expected = _sample_and_grads(image, grid, cot, method="gather", **kwargs)
    got = _sample_and_grads(image, grid, cot, method=method, **kwargs)
    for name, e, g in zip(("output", "d_image", "d_grid"), expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=rtol, atol=atol, err_msg=name)
    return got


def _random_affine_grid(key, batch, out_shape, dtype=jnp.float32):
    """Rotations, shears, zooms and shifts large enough to read outside the image."""
    noise = jax.random.uniform(key, (batch, 2, 3), dtype, -0.7, 0.7)
    return stn_jax.affine_grid(jnp.eye(2, 3, dtype=dtype) + noise, out_shape)


def _attention_grid(key, batch, out_shape, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    scale = jax.random.uniform(k1, (batch, 1), dtype, 0.3, 1.6)
    shift = jax.random.uniform(k2, (batch, 2), dtype, -0.8, 0.8)
    return stn_jax.attention_grid(jnp.concatenate([scale, shift], 1), out_shape)


# ---------------------------------------------------------------------------------------------
# Native kernel
# ---------------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("padding_mode,align_corners", CASES)
def test_native_matches_gather(padding_mode, align_corners):
    # One channel (the kernel's scalar loop) with align_corners=False, three with True.
    channels = 3 if align_corners else 1
    image = jax.random.normal(jax.random.key(0), (5, 7, 9, channels))
    grid = _random_affine_grid(jax.random.key(1), 5, (6, 8))
    _assert_same_as_gather("native", image, grid, padding_mode=padding_mode,
                           align_corners=align_corners)


@needs_native
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_native_many_images_split_over_threads(channels):
    # Enough points that the forward and the backward are split into several chunks, 300 points
    # per image (more than one 256-point block, not a multiple of the 16 vector lanes).
    image = jax.random.normal(jax.random.key(0), (67, 12, 10, channels))
    grid = _random_affine_grid(jax.random.key(1), 67, (20, 15))
    # d_grid reaches 86 here; where a sum over channels cancels (3 channels: one point at -0.61,
    # 4e-5 off) float32 rounding of its terms exceeds the default 2e-5.
    _assert_same_as_gather("native", image, grid, padding_mode="border", atol=1e-4)


@needs_native
@pytest.mark.parametrize("padding_mode,channels", list(itertools.product(MODES, (1, 3))))
def test_native_non_finite_and_huge_points(padding_mode, channels):
    image = jax.random.normal(jax.random.key(0), (2, 5, 6, channels))
    grid = jax.random.uniform(jax.random.key(1), (2, 4, 4, 2), minval=-1.5, maxval=1.5)
    bad = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 3e30, -3e30, 1e7])
    grid = grid.at[0, 0, :, 0].set(bad[:4]).at[1, 1, :, 1].set(bad[2:]).at[1, 3, 0].set(jnp.nan)
    out, d_image, d_grid = _assert_same_as_gather("native", image, grid, padding_mode=padding_mode)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(d_image)) and np.all(np.isfinite(d_grid))
    # NaN / inf points read 0 with zero grid gradient in every mode.
    np.testing.assert_array_equal(out[0, 0, :3], 0.0)
    np.testing.assert_array_equal(d_grid[0, 0, :3], 0.0)


@needs_native
@pytest.mark.parametrize("align_corners", [False, True])
def test_native_identity_and_integer_shift_are_exact(align_corners):
    image = jax.random.normal(jax.random.key(0), (2, 6, 7, 3))
    theta = stn_jax.identity_params("affine", batch_size=2)
    grid = stn_jax.affine_grid(theta, (6, 7), align_corners=align_corners)
    out = stn_jax.bilinear_sample(image, grid, align_corners=align_corners, method="native")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image))
    # A shift by exactly one pixel to the right reads the left neighbour.
    step = 2 / 7 if not align_corners else 2 / 6
    shifted = stn_jax.bilinear_sample(image, grid - jnp.array([step, 0.0]),
                                      align_corners=align_corners, method="native")
    np.testing.assert_allclose(shifted[:, :, 1:], image[:, :, :-1], atol=1e-6)
    np.testing.assert_array_equal(shifted[:, :, 0], 0.0)


@needs_native
@pytest.mark.parametrize("padding_mode,channels", list(itertools.product(("zeros", "border"), (1, 3))))
def test_native_reads_at_the_ends_of_the_image(padding_mode, channels):
    # The float32 forward reads the two taps of a row as one 8-byte pair; a pair starting one
    # pixel before the image (x0 = -1 in the first row) or at its last pixel must not be read,
    # and the kernel then reads that group of 16 points tap by tap. Points per image: 16 inside
    # (pairs only), 16 with such points at the corners, then a partial group of 5.
    h, w = 5, 7
    image = jax.random.normal(jax.random.key(0), (2, h, w, channels))
    inside = jax.random.uniform(jax.random.key(1), (16, 2), minval=0.5, maxval=h - 1.5)
    corners = jnp.array([[-0.5, 0.0], [w - 0.5, h - 1.0], [-0.5, -0.5], [w - 0.5, h - 0.5],
                         [-0.5, h - 1.0], [w - 0.5, -0.5], [0.0, 0.0], [w - 1.0, h - 1.0]])
    rest = jax.random.uniform(jax.random.key(2), (13, 2), minval=-1.5, maxval=w + 0.5)
    xy = jnp.concatenate([inside, corners, rest])  # pixel coordinates (x, y), 37 points
    grid = (2 * xy + 1) / jnp.array([w, h]) - 1  # align_corners=False
    grid = jnp.broadcast_to(grid, (2, 37, 2)).reshape(2, 1, 37, 2)
    out, _, _ = _assert_same_as_gather("native", image, grid, padding_mode=padding_mode)
    # By hand: half of the corner pixel beyond the left / right edge, a quarter beyond a
    # corner; border mode reads the pixel itself.
    corner = out[:, 0, 16:24]
    top_left, bottom_right = image[:, 0, 0], image[:, h - 1, w - 1]
    expected = {
        "zeros": [0.5 * top_left, 0.5 * bottom_right, 0.25 * top_left, 0.25 * bottom_right],
        "border": [top_left, bottom_right, top_left, bottom_right],
    }[padding_mode]
    for k, e in enumerate(expected):
        np.testing.assert_allclose(corner[:, k], e, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(corner[:, 6], top_left)
    np.testing.assert_array_equal(corner[:, 7], bottom_right)


@needs_native
@pytest.mark.parametrize("hw,channels", list(itertools.product(((1, 1), (1, 5), (5, 1), (2, 2)), (1, 3))))
def test_native_tiny_images(hw, channels):
    # One-pixel rows, columns and images, where the forward's 8-byte pair reads are at their
    # edge cases (a 1x1 image has no pair at all and takes single-float gathers; a stray float
    # of a pair is masked out of the values, so what this checks is the values, not the reads).
    image = jax.random.normal(jax.random.key(0), (3,) + hw + (channels,))
    grid = jax.random.uniform(jax.random.key(1), (3, 7, 5, 2), minval=-1.6, maxval=1.6)
    for padding_mode in ("zeros", "border"):
        out, _, _ = _assert_same_as_gather("native", image, grid, padding_mode=padding_mode)
        assert np.abs(np.asarray(out)).max() > 0.1  # the comparison is not vacuous


@needs_native
def test_native_hand_computed_value_and_grid_gradient():
    # One point at pixel coordinate (x, y) = (0.25, 0.5) of a 2x2 image, align_corners=True.
    image = jnp.array([[1.0, 2.0], [3.0, 7.0]]).reshape(1, 2, 2, 1)
    grid = jnp.array([[[[-0.5, 0.0]]]])
    value = (0.75 * 0.5 * 1 + 0.25 * 0.5 * 2 + 0.75 * 0.5 * 3 + 0.25 * 0.5 * 7)

    def f(g):
        return jnp.sum(stn_jax.bilinear_sample(image, g, align_corners=True, method="native"))

    np.testing.assert_allclose(f(grid), value, rtol=1e-6)
    # dV/dx = (1 - wy)(v01 - v00) + wy (v11 - v10) = 0.5 * 1 + 0.5 * 4; dx/dgx = 0.5.
    # dV/dy = (1 - wx)(v10 - v00) + wx (v11 - v01) = 0.75 * 2 + 0.25 * 5; dy/dgy = 0.5.
    np.testing.assert_allclose(jax.grad(f)(grid)[0, 0, 0], [2.5 * 0.5, 2.75 * 0.5], rtol=1e-6)


@needs_native
def test_native_float64_matches_gather_to_1e_12():
    with jax.enable_x64(True):
        image = jax.random.normal(jax.random.key(0), (3, 6, 5, 2), jnp.float64)
        grid = _random_affine_grid(jax.random.key(1), 3, (4, 7), jnp.float64)
        out, _, _ = _assert_same_as_gather("native", image, grid, rtol=1e-12, atol=1e-12,
                                           padding_mode="reflection")
        assert out.dtype == jnp.float64


@needs_native
def test_native_grad_of_grad_and_hessian_match_gather():
    image = jax.random.normal(jax.random.key(0), (2, 5, 6, 2))
    grid = _random_affine_grid(jax.random.key(1), 2, (3, 3))

    def loss(method):
        def f(i, g):
            out = stn_jax.bilinear_sample(i, g, method=method, padding_mode="border")
            return jnp.sum(jnp.sin(out))
        return f

    def second_derivatives(method):
        # Reverse over reverse (grid-grid and grid-image blocks) and forward over reverse.
        grad_grid = jax.grad(loss(method), argnums=1)
        return (jax.jacrev(grad_grid, argnums=(0, 1))(image, grid),
                jax.hessian(loss(method), argnums=1)(image, grid))

    expected = jax.jit(second_derivatives, static_argnums=0)("gather")
    got = jax.jit(second_derivatives, static_argnums=0)("native")
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        assert np.abs(e).max() > 0.1  # the comparison is not vacuous
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@needs_native
def test_native_vmap_and_extra_sample_dims_match_gather():
    images = jax.random.normal(jax.random.key(0), (3, 2, 5, 6, 2))
    grids = _random_affine_grid(jax.random.key(1), 6, (4, 3)).reshape(3, 2, 4, 3, 2)

    def f(method):
        return jax.vmap(lambda i, g: stn_jax.bilinear_sample(i, g, method=method))

    np.testing.assert_allclose(f("native")(images, grids), f("gather")(images, grids), atol=1e-6)

    def grads(method):
        def loss(i, g):
            return jnp.sum(jnp.cos(stn_jax.bilinear_sample(i, g, method=method)))
        return jax.vmap(jax.grad(loss, argnums=(0, 1)))

    for got, expected in zip(grads("native")(images, grids), grads("gather")(images, grids)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # One image, several warps: grid (B, T, H', W', 2).
    grid = grids.reshape(2, 3, 4, 3, 2)
    np.testing.assert_allclose(
        stn_jax.bilinear_sample(images[0], grid, method="native"),
        stn_jax.bilinear_sample(images[0], grid, method="gather"),
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# Separable path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode,align_corners", CASES)
def test_separable_matches_gather_on_attention_grids(padding_mode, align_corners):
    image = jax.random.normal(jax.random.key(0), (4, 9, 7, 2))
    grid = _attention_grid(jax.random.key(1), 4, (5, 6))
    assert bool(_fast_paths._is_separable(grid))
    _assert_same_as_gather("separable", image, grid, padding_mode=padding_mode,
                           align_corners=align_corners)


def test_separable_axis_aligned_affine_and_bf16():
    theta = jnp.array([[[0.6, 0.0, 0.3], [0.0, 1.4, -0.2]], [[-1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]])
    grid = stn_jax.affine_grid(theta, (6, 5))
    assert bool(_fast_paths._is_separable(grid))
    image = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    _assert_same_as_gather("separable", image, grid)
    out = stn_jax.bilinear_sample(image.astype(jnp.bfloat16), grid, method="separable")
    ref = stn_jax.bilinear_sample(image.astype(jnp.bfloat16), grid, method="gather")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)


def test_separable_falls_back_to_gather_for_other_grids():
    image = jax.random.normal(jax.random.key(0), (3, 6, 6, 1))
    grid = _random_affine_grid(jax.random.key(1), 3, (5, 5))
    assert not bool(_fast_paths._is_separable(grid))
    _assert_same_as_gather("separable", image, grid, rtol=0, atol=0)
    # A NaN breaks the equality test, so non-finite points also take the reference path.
    grid = _attention_grid(jax.random.key(2), 3, (5, 5)).at[0, 2, 2, 0].set(jnp.nan)
    assert not bool(_fast_paths._is_separable(grid))
    _assert_same_as_gather("separable", image, grid, rtol=0, atol=0)


@pytest.mark.parametrize(
    "theta",
    [
        [[1.0, 0.0, 0.0], [0.3, 1.0, 0.0]],  # y-shear: every row has the same x, columns differ in y
        [[1.0, 0.3, 0.0], [0.0, 1.0, 0.0]],  # x-shear: every column has the same y, rows differ in x
    ],
    ids=["separable_in_x_only", "separable_in_y_only"],
)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflection"])
def test_separable_with_grids_separable_along_one_axis(theta, padding_mode):
    # A grid that passes the check along one axis only must still take the gather path: the
    # separable warp would read the first row's (or column's) coordinates everywhere (off by
    # 2.19 for the y-shear).
    image = jax.random.normal(jax.random.key(3), (2, 7, 8, 2))
    grid = stn_jax.affine_grid(jnp.broadcast_to(jnp.array(theta), (2, 2, 3)), (6, 5))
    out, _, _ = _assert_same_as_gather("separable", image, grid, padding_mode=padding_mode)
    assert np.abs(np.asarray(out)).max() > 0.5  # the comparison is not vacuous


def test_separable_needs_a_2d_sample_grid():
    with pytest.raises(ValueError, match="separable"):
        stn_jax.bilinear_sample(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 5, 2)), method="separable")


# ---------------------------------------------------------------------------------------------
# Choice of the path
# ---------------------------------------------------------------------------------------------


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="method"):
        stn_jax.bilinear_sample(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 2, 2)), method="fast")


def test_auto_choice(monkeypatch):
    f32 = jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 2, 2))
    bf16 = jnp.zeros((1, 4, 4, 1), jnp.bfloat16), jnp.zeros((1, 2, 2, 2))
    expected = "auto-native" if _native.available() else "gather"
    assert _fast_paths.resolve_method("auto", *f32) == expected
    # bf16/f16 images run the kernel in float32; float64 with float32 takes the gather path.
    assert _fast_paths.resolve_method("auto", *bf16) == expected
    with jax.enable_x64(True):
        mixed = jnp.zeros((1, 4, 4, 1), jnp.float64), jnp.zeros((1, 2, 2, 2), jnp.float32)
        assert _fast_paths.resolve_method("auto", *mixed) == "gather"
        with pytest.raises(ValueError, match="float32 or float64"):
            _fast_paths.resolve_method("native", *mixed)
    # Without the native kernels, auto is the reference and forcing native says why.
    monkeypatch.setattr(_native, "available", lambda: False)
    monkeypatch.setattr(_native, "error", lambda: "no compiler")
    assert _fast_paths.resolve_method("auto", *f32) == "gather"
    with pytest.raises(RuntimeError, match="no compiler"):
        stn_jax.bilinear_sample(*f32, method="native")


def test_native_build_failure_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("STN_JAX_NATIVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="failed"):
        _native.build()
    assert list(tmp_path.iterdir()) == []  # no half-written library is left behind


@needs_native
@pytest.mark.skipif(" avx512f" not in _native._cpu_flags(),
                    reason="without AVX-512 the tests above run the portable path")
def test_native_portable_build_matches_gather(tmp_path):
    # On an AVX-512 machine the float32 forward of 1 and 3 channels takes the intrinsics path;
    # build the kernels without AVX-512 (as on AVX2-only CPUs) and run, in a fresh process
    # against that build, the native tests that cover the portable forward's paths: every
    # padding mode with 1 and 3 channels, and the reads at the ends of the image.
    import pathlib
    import subprocess
    import sys

    env = dict(os.environ, CXX="g++ -mno-avx512f", STN_JAX_NATIVE_CACHE_DIR=str(tmp_path))
    here = pathlib.Path(__file__)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(here),
         "-k", "test_native_matches_gather or test_native_reads_at_the_ends_of_the_image"],
        env=env, capture_output=True, text=True, timeout=600, cwd=here.parent.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].startswith("10 passed"), result.stdout[-500:]
    (library,) = tmp_path.glob("libstn_jax_native-*.so")
    disassembly = subprocess.run(["objdump", "-d", str(library)], capture_output=True,
                                 text=True).stdout
    assert disassembly and "zmm" not in disassembly  # really built without AVX-512


@jax.jit
def _native_sample_grads_and_sums(image, grid, cotangent):
    """Sample and both gradients, and their sums computed in the same executable right after
    the kernels: a kernel that returned before its helpers' chunks were written would give
    sums of unwritten memory."""
    outs = _sample_and_grads(image, grid, cotangent, method="native")
    return outs + tuple(jnp.sum(o) for o in outs)


@needs_native
def test_native_concurrent_callers_get_their_own_results():
    # Several Python threads call the native kernels back to back, so calls overlap and the
    # pool's lingering helper takes jobs posted by different callers (bilinear.cc, Threads):
    # every result must be its own caller's, equal to the one computed alone.
    import concurrent.futures

    shapes = [(40, 16, 16, 1), (40, 16, 16, 3), (9, 20, 24, 2)]
    keys = jax.random.split(jax.random.key(0), 3 * len(shapes))
    images = [jax.random.normal(keys[3 * i], s) for i, s in enumerate(shapes)]
    grids = [_random_affine_grid(keys[3 * i + 1], s[0], (14, 18)) for i, s in enumerate(shapes)]
    cots = [jax.random.normal(keys[3 * i + 2], (s[0], 14, 18, s[3])) for i, s in enumerate(shapes)]
    expected = [_native_sample_grads_and_sums(*args) for args in zip(images, grids, cots)]
    reference = _sample_and_grads(images[0], grids[0], cots[0], method="gather")
    for e, r in zip(expected[0], reference):
        np.testing.assert_allclose(np.asarray(e), np.asarray(r), rtol=2e-5, atol=2e-5)

    def run(k):
        for _ in range(30):
            got = _native_sample_grads_and_sums(images[k], grids[k], cots[k])
            for g, e in zip(got, expected[k]):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
        return k

    with concurrent.futures.ThreadPoolExecutor(len(shapes)) as pool:
        assert sorted(pool.map(run, range(len(shapes)))) == list(range(len(shapes)))


def test_native_disabled_by_environment_takes_the_gather_path():
    # STN_JAX_NATIVE=0, read when the kernels are first asked for: auto resolves to the gather
    # path (no FFI call in the lowered function), forcing native says why, and the values are
    # the gather path's, bit for bit. In a fresh process: this one has loaded the kernels.
    import subprocess
    import sys

    code = """
import jax, jax.numpy as jnp, numpy as np, stn_jax
from stn_jax import _fast_paths, _native
image = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
grid = jax.random.uniform(jax.random.key(1), (2, 4, 3, 2), minval=-1.3, maxval=1.3)
assert not _native.available() and _native.error() == "disabled by STN_JAX_NATIVE=0", _native.error()
assert _fast_paths.resolve_method("auto", image, grid) == "gather"
text = jax.jit(lambda i, g: stn_jax.bilinear_sample(i, g)).lower(image, grid).as_text()
assert "stn_jax_bilinear" not in text
auto = stn_jax.bilinear_sample(image, grid, padding_mode="reflection")
gather = stn_jax.bilinear_sample(image, grid, padding_mode="reflection", method="gather")
np.testing.assert_array_equal(auto, gather)
try:
    stn_jax.bilinear_sample(image, grid, method="native")
except RuntimeError as err:
    assert "STN_JAX_NATIVE=0" in str(err), err
else:
    raise AssertionError("method='native' ran although disabled")
print("ok")
"""
    env = dict(os.environ, STN_JAX_NATIVE="0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    # The FFI target's name, as the lowered text of an enabled process shows it.
    if _native.available():
        text = jax.jit(lambda i, g: stn_jax.bilinear_sample(i, g)).lower(
            jnp.zeros((2, 5, 6, 3)), jnp.zeros((2, 4, 3, 2))).as_text()
        assert "stn_jax_bilinear" in text


def test_ci_run_stops_when_the_native_build_fails(tmp_path):
    # tests/conftest.py: with CI=true a failed native build is a failed run, not 24 skips.
    import subprocess
    import sys

    env = dict(os.environ, CI="true", CXX="false", STN_JAX_NATIVE_CACHE_DIR=str(tmp_path))
    env.pop("STN_JAX_NATIVE", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
         "tests/test_package.py"],
        env=env, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode != 0
    assert "CI=true and the native kernels do not build or load" in result.stdout + result.stderr

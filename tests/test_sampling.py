"""Tests of stn_jax.sampling against a dense float64 reference of eqs. (3)-(7), finite
differences, hand-computed values and (where installed) torch.nn.functional.grid_sample."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stn_jax
from stn_jax import bilinear_sample, nearest_sample

MODES = ("zeros", "border", "reflection")
CASES = list(itertools.product(MODES, (False, True)))


# ---------------------------------------------------------------------------------------------
# A dense float64 reference, written independently of the implementation: eq. (5) summed over
# every input pixel, with the padding transforms written as a periodic fold.
# ---------------------------------------------------------------------------------------------


def _ref_coord(g, size, padding_mode, align_corners):
    """Normalised -> pixel coordinate and its derivative, numpy float64."""
    if align_corners:
        x, d = (g + 1) / 2 * (size - 1), np.full_like(g, (size - 1) / 2)
    else:
        x, d = ((g + 1) * size - 1) / 2, np.full_like(g, size / 2)
    # The documented snap: within float rounding of an integer means on it.
    x = np.where(np.abs(x - np.round(x)) < 1e-12 * (size + 1), np.round(x), x)
    if padding_mode == "zeros":
        return x, d
    if padding_mode == "reflection":
        lo, hi = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
        if hi == lo:
            return np.zeros_like(x), np.zeros_like(d)
        period = 2 * (hi - lo)
        t = np.mod(x - lo, period)
        back = t > hi - lo
        x = np.where(back, lo + period - t, lo + t)
        d = np.where(back, -d, d)
    inside = (x > 0) & (x < size - 1)
    return np.clip(x, 0, size - 1), np.where(inside, d, 0.0)


def _tent(t):
    return np.maximum(0.0, 1.0 - np.abs(t))


def _tent_right_derivative(t):
    # One-sided (right) derivative of max(0, 1 - |t|): the floor convention at integers.
    return np.where((t >= -1) & (t < 0), 1.0, np.where((t >= 0) & (t < 1), -1.0, 0.0))


def dense_reference(image, grid, cotangent, padding_mode, align_corners):
    """Returns (out, d_image, d_grid) of sum(out * cotangent), all float64, by eqs. (5)-(7)."""
    image = np.asarray(image, np.float64)
    b, h, w, c = image.shape
    g = np.asarray(grid, np.float64).reshape(b, -1, 2)
    ct = np.asarray(cotangent, np.float64).reshape(b, -1, c)
    x, dx = _ref_coord(g[..., 0], w, padding_mode, align_corners)
    y, dy = _ref_coord(g[..., 1], h, padding_mode, align_corners)
    kx = _tent(x[..., None] - np.arange(w))  # (B, N, W)
    ky = _tent(y[..., None] - np.arange(h))  # (B, N, H)
    dkx = _tent_right_derivative(x[..., None] - np.arange(w))
    dky = _tent_right_derivative(y[..., None] - np.arange(h))
    out = np.einsum("bnh,bnw,bhwc->bnc", ky, kx, image)
    d_image = np.einsum("bnh,bnw,bnc->bhwc", ky, kx, ct)
    d_x = np.einsum("bnh,bnw,bhwc,bnc->bn", ky, dkx, image, ct) * dx
    d_y = np.einsum("bnh,bnw,bhwc,bnc->bn", dky, kx, image, ct) * dy
    d_grid = np.stack([d_x, d_y], -1).reshape(np.shape(grid))
    return out.reshape(np.shape(grid)[:-1] + (c,)), d_image, d_grid


def _grid_with_special_points(rng, shape, image_hw, align_corners):
    """Random grid in [-1.6, 1.6] with exact integer pixel coordinates, the borders +-1 and
    points beyond them planted in it. image_hw is chosen so the integers are exact floats."""
    grid = rng.uniform(-1.6, 1.6, size=shape)
    flat = grid.reshape(-1, 2)
    h, w = image_hw
    n = flat.shape[0]
    js = rng.integers(0, w, size=n // 3)
    is_ = rng.integers(0, h, size=n // 3)
    if align_corners:
        flat[: n // 3, 0] = 2 * js / (w - 1) - 1
        flat[: n // 3, 1] = 2 * is_ / (h - 1) - 1
    else:
        flat[: n // 3, 0] = (2 * js + 1) / w - 1
        flat[: n // 3, 1] = (2 * is_ + 1) / h - 1
    flat[n // 3 : n // 3 + 4] = [[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]]
    return grid


def _loss(image, grid, cotangent, sampler=bilinear_sample, **kw):
    return jnp.sum(sampler(image, grid, **kw) * cotangent)


# ---------------------------------------------------------------------------------------------
# Exact identities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("hw", [(28, 28), (5, 7), (1, 6), (42, 17)])
@pytest.mark.parametrize("sampler", [bilinear_sample, nearest_sample])
def test_identity_grid_reproduces_image_exactly(align_corners, hw, sampler):
    image = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
    theta = stn_jax.identity_params("affine", batch_size=2)
    grid = stn_jax.affine_grid(theta, hw, align_corners=align_corners)
    out = sampler(image, grid, align_corners=align_corners)
    np.testing.assert_array_equal(out, image)
    d_image = jax.grad(lambda im: jnp.sum(sampler(im, grid, align_corners=align_corners)))(image)
    np.testing.assert_array_equal(d_image, np.ones_like(image))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shift", [(1, 0), (-2, 3), (0, -1)])
def test_integer_translation_is_a_shift(align_corners, shift):
    h, w = 6, 9
    image = np.random.default_rng(1).normal(size=(1, h, w, 2)).astype(np.float32)
    kx, ky = shift
    step_x = 2 / (w - 1) if align_corners else 2 / w
    step_y = 2 / (h - 1) if align_corners else 2 / h
    theta = np.array([[[1, 0, kx * step_x], [0, 1, ky * step_y]]], np.float32)
    out = bilinear_sample(
        image, stn_jax.affine_grid(theta, (h, w), align_corners=align_corners),
        align_corners=align_corners,
    )
    # out[i, j] = image[i + ky, j + kx], zero where that is outside.
    expected = np.zeros_like(image)
    src = image[:, max(ky, 0) : h + min(ky, 0), max(kx, 0) : w + min(kx, 0)]
    expected[:, max(-ky, 0) : h - max(ky, 0), max(-kx, 0) : w - max(kx, 0)] = src
    np.testing.assert_array_equal(out, expected)


def test_hand_computed_bilinear_value_and_gradients():
    # A 2x2 image read at its centre with align_corners=True: x = y = 0.5.
    image = jnp.array([[1.0, 2.0], [3.0, 5.0]]).reshape(1, 2, 2, 1)
    grid = jnp.zeros((1, 1, 1, 2))
    out = bilinear_sample(image, grid, align_corners=True)
    assert float(out[0, 0, 0, 0]) == pytest.approx((1 + 2 + 3 + 5) / 4)
    d_image, d_grid = jax.grad(
        lambda im, g: jnp.sum(bilinear_sample(im, g, align_corners=True)), argnums=(0, 1)
    )(image, grid)
    np.testing.assert_allclose(d_image[0, :, :, 0], [[0.25, 0.25], [0.25, 0.25]])
    # d/dx = 0.5 * ((2 - 1) + (5 - 3)) = 1.5 per pixel; dx/dg = (W - 1) / 2 = 0.5.
    # d/dy = 0.5 * ((3 - 1) + (5 - 2)) = 2.5 per pixel; dy/dg = 0.5.
    np.testing.assert_allclose(d_grid[0, 0, 0], [0.75, 1.25], rtol=1e-6)


def test_integer_coordinate_uses_floor_one_sided_derivative():
    # x = 1 exactly on a 1x4 row [0, 1, 4, 9]: floor taps are pixels 1 and 2, so d/dx = 4 - 1.
    image = jnp.array([0.0, 1.0, 4.0, 9.0]).reshape(1, 1, 4, 1)
    g = 2 * 1 / 3 - 1  # align_corners=True: x = (g + 1) / 2 * 3 = 1
    grid = jnp.array([[[[g, 0.0]]]])
    d_grid = jax.grad(lambda gr: jnp.sum(bilinear_sample(image, gr, align_corners=True)))(grid)
    assert float(d_grid[0, 0, 0, 0]) == pytest.approx((4.0 - 1.0) * 1.5, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Dense float64 reference and finite differences
# ---------------------------------------------------------------------------------------------


# "auto" is the native kernel where it builds; "gather" is the hand-written custom_vjp of
# sampling.py, which every other path is tested against, so it meets the reference directly.
# Each padding case with one of three shapes (non-square, down, up) in turn, not all nine
# pairs: every method meets every shape twice and every padding mode two shapes. Each case is
# a compile of its own (about 2 s of CPU), and no path branches on the shape.
_SHAPES = [((5, 8), (7, 6)), ((9, 8), (3, 11)), ((5, 4), (12, 10))]
DENSE_CASES = [(mode, ac, *_SHAPES[k % 3]) for k, (mode, ac) in enumerate(CASES)]


@pytest.mark.parametrize("method", ["auto", "gather"])
@pytest.mark.parametrize("padding_mode,align_corners,image_hw,grid_hw", DENSE_CASES)
def test_matches_dense_reference_float64(padding_mode, align_corners, image_hw, grid_hw, method):
    # crc32, not hash(): string hashes change per process, and a failure must reproduce.
    rng = np.random.default_rng(zlib.crc32(repr((padding_mode, align_corners, image_hw)).encode()))
    image = rng.normal(size=(2, *image_hw, 3))
    grid = _grid_with_special_points(rng, (2, *grid_hw, 2), image_hw, align_corners)
    cotangent = rng.normal(size=(2, *grid_hw, 3))
    want_out, want_di, want_dg = dense_reference(image, grid, cotangent, padding_mode, align_corners)
    with jax.enable_x64(True):
        kw = dict(padding_mode=padding_mode, align_corners=align_corners, method=method)
        out = bilinear_sample(jnp.asarray(image), jnp.asarray(grid), **kw)
        d_image, d_grid = jax.grad(_loss, argnums=(0, 1))(
            jnp.asarray(image), jnp.asarray(grid), jnp.asarray(cotangent), **kw
        )
        assert out.dtype == d_image.dtype == d_grid.dtype == jnp.float64
    np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(d_image, want_di, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(d_grid, want_dg, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["auto", "gather"])
@pytest.mark.parametrize("padding_mode,align_corners", CASES)
def test_float32_matches_dense_reference(padding_mode, align_corners, method):
    rng = np.random.default_rng(7)
    image = rng.normal(size=(3, 6, 5, 4)).astype(np.float32)
    grid = rng.uniform(-1.3, 1.3, size=(3, 4, 7, 2)).astype(np.float32)
    cotangent = rng.normal(size=(3, 4, 7, 4)).astype(np.float32)
    want = dense_reference(image, grid, cotangent, padding_mode, align_corners)
    kw = dict(padding_mode=padding_mode, align_corners=align_corners, method=method)
    out = bilinear_sample(image, grid, **kw)
    grads = jax.grad(_loss, argnums=(0, 1))(image, grid, cotangent, **kw)
    for got, ref in zip((out, *grads), want):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)


def _far_coords(rng, n, size, align_corners):
    """n normalised coordinates along an axis of `size` pixels: a quarter inside the image, the
    rest 1 to 5 whole reflection spans beyond either edge, each at a fraction in [0.1, 0.9] of
    its span (away from the folds). Points an even number of spans away (2, 4) fold back with
    the sign kept, odd ones with it flipped: a parity error shows in values and gradients."""
    lo, hi = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
    span = hi - lo
    k = rng.choice([-6, -5, -4, -3, -2, 0, 0, 0, 2, 3, 4, 5], size=n)
    x = lo + (k + rng.uniform(0.1, 0.9, n)) * span
    return 2 * x / (size - 1) - 1 if align_corners else (2 * x + 1) / size - 1


def _far_grid(rng, batch, grid_hw, image_hw, align_corners):
    n = batch * grid_hw[0] * grid_hw[1]
    gx = _far_coords(rng, n, image_hw[1], align_corners)
    gy = _far_coords(rng, n, image_hw[0], align_corners)
    return np.stack([gx, gy], -1).reshape(batch, *grid_hw, 2)


@pytest.mark.parametrize("method", ["auto", "gather"])
@pytest.mark.parametrize("padding_mode,align_corners", CASES)
def test_points_several_spans_away_match_dense_reference(padding_mode, align_corners, method):
    # Reflection folds a point 2, 3, 4 or 5 spans away back with the parity of its fold count;
    # zeros and border read 0 and the edge there.
    rng = np.random.default_rng(11)
    image_hw = (5, 7)
    image = rng.normal(size=(2, *image_hw, 3))
    grid = _far_grid(rng, 2, (6, 8), image_hw, align_corners)
    cotangent = rng.normal(size=(2, 6, 8, 3))
    want = dense_reference(image, grid, cotangent, padding_mode, align_corners)
    with jax.enable_x64(True):
        kw = dict(padding_mode=padding_mode, align_corners=align_corners, method=method)
        out = bilinear_sample(jnp.asarray(image), jnp.asarray(grid), **kw)
        grads = jax.grad(_loss, argnums=(0, 1))(
            jnp.asarray(image), jnp.asarray(grid), jnp.asarray(cotangent), **kw
        )
    for got, ref in zip((out, *grads), want):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    if padding_mode == "reflection":
        # The test checks something: most points read the image, and some grid gradients
        # had their sign flipped an even number of times (>= 2 spans).
        assert np.abs(want[0]).max() > 0.5 and np.abs(want[2]).max() > 0.5


@pytest.mark.parametrize("padding_mode,align_corners", CASES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_points_several_spans_away_match_torch(padding_mode, align_corners, mode):
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install torch==2.13.0 to cross-check")
    F = torch.nn.functional
    rng = np.random.default_rng(12)
    image = rng.normal(size=(2, 6, 9, 3)).astype(np.float32)
    grid = _far_grid(rng, 2, (7, 5), image.shape[1:3], align_corners).astype(np.float32)
    ct = rng.normal(size=(2, 7, 5, 3)).astype(np.float32)
    t_image = torch.tensor(image).permute(0, 3, 1, 2).requires_grad_()
    t_grid = torch.tensor(grid).requires_grad_()
    t_out = F.grid_sample(t_image, t_grid, mode=mode, padding_mode=padding_mode,
                          align_corners=align_corners)
    (t_out * torch.tensor(ct).permute(0, 3, 1, 2)).sum().backward()
    sampler = bilinear_sample if mode == "bilinear" else nearest_sample
    kw = dict(padding_mode=padding_mode, align_corners=align_corners)
    out = sampler(image, grid, **kw)
    d_image, d_grid = jax.grad(_loss, argnums=(0, 1))(image, grid, ct, sampler=sampler, **kw)
    np.testing.assert_allclose(out, t_out.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=3e-5)
    np.testing.assert_allclose(d_image, t_image.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=3e-5)
    if mode == "bilinear":
        ref = t_grid.grad.numpy()
        np.testing.assert_allclose(d_grid, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("padding_mode,align_corners", CASES)
def test_gradients_match_finite_differences(padding_mode, align_corners):
    rng = np.random.default_rng(3)
    h, w = 5, 6
    image = rng.normal(size=(1, h, w, 2))
    # Pixel coordinates with fractional parts in [0.2, 0.8], inside and beyond the image (for
    # reflection), so no point is within the step of a kink.
    px = rng.integers(-3 if padding_mode == "reflection" else 0, w + 2, size=10) + rng.uniform(0.2, 0.8, 10)
    py = rng.integers(-3 if padding_mode == "reflection" else 0, h + 2, size=10) + rng.uniform(0.2, 0.8, 10)
    if padding_mode != "reflection":
        px, py = np.clip(px, 0.2, w - 1.2), np.clip(py, 0.2, h - 1.2)
    if align_corners:
        grid = np.stack([2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1], -1)
    else:
        grid = np.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], -1)
    grid = grid.reshape(1, 2, 5, 2)
    cotangent = rng.normal(size=(1, 2, 5, 2))
    kw = dict(padding_mode=padding_mode, align_corners=align_corners)
    eps = 1e-6
    with jax.enable_x64(True):
        f = lambda im, g: float(_loss(jnp.asarray(im), jnp.asarray(g), jnp.asarray(cotangent), **kw))
        d_image, d_grid = jax.grad(_loss, argnums=(0, 1))(
            jnp.asarray(image), jnp.asarray(grid), jnp.asarray(cotangent), **kw
        )
        fd_grid = np.zeros_like(grid)
        for idx in np.ndindex(grid.shape):
            e = np.zeros_like(grid)
            e[idx] = eps
            fd_grid[idx] = (f(image, grid + e) - f(image, grid - e)) / (2 * eps)
        fd_image = np.zeros_like(image)
        for idx in np.ndindex(image.shape):
            e = np.zeros_like(image)
            e[idx] = eps
            fd_image[idx] = (f(image + e, grid) - f(image - e, grid)) / (2 * eps)
    assert np.abs(d_grid).max() > 0.1  # the test checks something
    np.testing.assert_allclose(d_grid, fd_grid, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(d_image, fd_image, rtol=1e-6, atol=1e-7)


def test_grad_of_grad_matches_hand_computed_second_derivatives():
    # Inside a cell, V(x, y) is bilinear: d2V/dxdy = v11 - v10 - v01 + v00, d2V/dx2 = 0.
    image = jnp.array([[1.0, 2.0], [3.0, 7.0]]).reshape(1, 2, 2, 1)
    grid = jnp.array([[[[0.1, -0.3]]]])

    def value(g):
        return jnp.sum(bilinear_sample(image, g, align_corners=True))

    hess = jax.jacrev(jax.grad(value))(grid)[0, 0, 0, :, 0, 0, 0, :]
    scale = 0.5 * 0.5  # dx/dgx * dy/dgy for a 2x2 image, align_corners=True
    np.testing.assert_allclose(hess, [[0.0, (7 - 3 - 2 + 1) * scale], [(7 - 3 - 2 + 1) * scale, 0.0]], atol=1e-6)
    # Mixed: d/dimage of dV/dgx. dV/dx = (1 - wy)(U01 - U00) + wy (U11 - U10), wy = 0.35.
    mixed = jax.grad(lambda im: jax.grad(
        lambda g: jnp.sum(bilinear_sample(im, g, align_corners=True)))(grid)[0, 0, 0, 0])(image)
    wy = (-0.3 + 1) / 2
    np.testing.assert_allclose(
        mixed[0, :, :, 0], 0.5 * np.array([[-(1 - wy), 1 - wy], [-wy, wy]]), rtol=1e-6
    )


def _native_or_skip(method):
    from stn_jax import _native

    # In CI the native kernel must build (tests/conftest.py fails the run otherwise).
    if method == "native" and not _native.available():
        pytest.skip(f"native kernels unavailable: {_native.error()}")


@pytest.mark.parametrize("method", ["gather", "native"])
@pytest.mark.parametrize("padding_mode,align_corners", [("zeros", True), ("reflection", False)])
def test_second_derivatives_match_finite_differences_of_the_gradient(padding_mode, align_corners, method):
    # Hessian-vector products of a non-linear loss of the output, by reverse over reverse and by
    # forward over reverse, against central differences of the first derivative (the
    # hand-written VJP) along random directions in (image, grid) space.
    _native_or_skip(method)
    rng = np.random.default_rng(13)
    h, w = 5, 6
    image = rng.normal(size=(1, h, w, 2))
    # Fractional pixel parts in [0.2, 0.8]: no point is within the step of a kink; with
    # reflection some points lie beyond the edges (one fold flips the gradient's sign).
    lo = -3 if padding_mode == "reflection" else 0
    px = rng.integers(lo, w - 1 - lo, size=6) + rng.uniform(0.2, 0.8, 6)
    py = rng.integers(lo, h - 1 - lo, size=6) + rng.uniform(0.2, 0.8, 6)
    if padding_mode != "reflection":
        px, py = np.clip(px, 0.2, w - 1.2), np.clip(py, 0.2, h - 1.2)
    if align_corners:
        grid = np.stack([2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1], -1)
    else:
        grid = np.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], -1)
    grid = grid.reshape(1, 2, 3, 2)
    cotangent = rng.normal(size=(1, 2, 3, 2))
    kw = dict(padding_mode=padding_mode, align_corners=align_corners, method=method)
    with jax.enable_x64(True):
        image, grid, cotangent = (jnp.asarray(a) for a in (image, grid, cotangent))

        def loss(i, g):
            return jnp.sum(jnp.sin(2 * bilinear_sample(i, g, **kw)) * cotangent)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        fwd_rev = jax.jit(lambda i, g, vi, vg: jax.jvp(grad, (i, g), (vi, vg))[1])
        # The Hessian is symmetric: the gradient of <grad, v> is H v.
        rev_rev = jax.jit(jax.grad(
            lambda i, g, vi, vg: sum(jnp.vdot(a, v) for a, v in zip(grad(i, g), (vi, vg))),
            argnums=(0, 1)))
        eps = 1e-6
        for _ in range(3):
            v = (jnp.asarray(rng.normal(size=image.shape)), jnp.asarray(rng.normal(size=grid.shape)))
            plus = grad(image + eps * v[0], grid + eps * v[1])
            minus = grad(image - eps * v[0], grid - eps * v[1])
            for name, hv in (("fwd_rev", fwd_rev(image, grid, *v)), ("rev_rev", rev_rev(image, grid, *v))):
                for part, p, m, got in zip(("image", "grid"), plus, minus, hv):
                    want = (p - m) / (2 * eps)
                    assert np.abs(want).max() > 0.1  # the check is not vacuous
                    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{name} {part}")


# ---------------------------------------------------------------------------------------------
# Transformations: jit, vmap, retracing, extra sample dims, dtypes, determinism
# ---------------------------------------------------------------------------------------------


def test_jit_equals_eager_and_no_retrace():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(2, 7, 9, 3)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, size=(2, 5, 4, 2)).astype(np.float32)
    ct = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    for mode, ac in CASES:
        kw = dict(padding_mode=mode, align_corners=ac)
        grad_fn = jax.grad(_loss, argnums=(0, 1))
        jitted = jax.jit(grad_fn, static_argnames=("padding_mode", "align_corners"))
        np.testing.assert_allclose(jitted(image, grid, ct, **kw)[1], grad_fn(image, grid, ct, **kw)[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            jax.jit(lambda i, g: bilinear_sample(i, g, **kw))(image, grid), bilinear_sample(image, grid, **kw), rtol=1e-6, atol=1e-7,
        )
    jitted = jax.jit(lambda i, g: bilinear_sample(i, g))
    for k in range(3):
        jitted(image + k, grid * (1 - 0.1 * k)).block_until_ready()
    assert jitted._cache_size() == 1
    # Eager calls go through the module's own jitted functions: one entry per shape, too.
    from stn_jax import _fast_paths, sampling

    shape = (3, 7, 9, 3)  # a batch size no other test uses
    auto = _fast_paths.resolve_method("auto", jnp.zeros(shape), jnp.zeros((3, 5, 4, 2)))
    auto_fn = sampling._bilinear_jit if auto == "gather" else _fast_paths.bilinear_jit
    for method, fn, out_w in (("auto", auto_fn, 4), ("gather", sampling._bilinear_jit, 6)):
        before = fn._cache_size()
        for k in range(3):
            bilinear_sample(np.full(shape, k, np.float32), np.zeros((3, 5, out_w, 2), np.float32),
                            method=method).block_until_ready()
        assert fn._cache_size() == before + 1, method


def test_vmap_equals_loop():
    rng = np.random.default_rng(5)
    images = rng.normal(size=(4, 2, 6, 5, 3)).astype(np.float32)  # an extra outer batch
    grids = rng.uniform(-1.2, 1.2, size=(4, 2, 3, 8, 2)).astype(np.float32)
    ct = rng.normal(size=(4, 2, 3, 8, 3)).astype(np.float32)
    f = lambda i, g, c: jax.grad(_loss, argnums=(0, 1))(i, g, c, padding_mode="reflection")
    batched = jax.vmap(f)(images, grids, ct)
    for k in range(4):
        looped = f(images[k], grids[k], ct[k])
        np.testing.assert_allclose(batched[0][k], looped[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(batched[1][k], looped[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", [bilinear_sample, nearest_sample])
def test_extra_sample_dims_equal_separate_calls(sampler):
    rng = np.random.default_rng(6)
    image = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    grids = rng.uniform(-1, 1, size=(2, 3, 4, 5, 2)).astype(np.float32)  # 3 warps per image
    out = sampler(image, grids)
    assert out.shape == (2, 3, 4, 5, 3)
    for t in range(3):
        np.testing.assert_array_equal(out[:, t], sampler(image, grids[:, t]))
    # Points only: (B, N, 2) -> (B, N, C).
    np.testing.assert_array_equal(sampler(image, grids[:, 0, 0]), out[:, 0, 0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_images_accumulate_in_float32(dtype):
    rng = np.random.default_rng(8)
    image32 = rng.uniform(0, 1, size=(2, 9, 9, 3)).astype(np.float32)
    image = jnp.asarray(image32, dtype)
    grid = rng.uniform(-1, 1, size=(2, 5, 5, 2)).astype(np.float32)
    out = bilinear_sample(image, grid)
    assert out.dtype == dtype
    # Reference: the same (rounded) image values sampled in float32, rounded once at the end.
    want = bilinear_sample(image.astype(jnp.float32), grid).astype(dtype)
    np.testing.assert_array_equal(out.astype(np.float32), want.astype(np.float32))
    d_image, d_grid = jax.grad(lambda i, g: jnp.sum(bilinear_sample(i, g).astype(jnp.float32)), argnums=(0, 1))(image, grid)
    assert d_image.dtype == dtype and d_grid.dtype == jnp.float32
    want_dg = jax.grad(lambda g: jnp.sum(bilinear_sample(image.astype(jnp.float32), g)))(grid)
    np.testing.assert_allclose(d_grid, want_dg, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["auto", "gather"])
def test_backward_is_deterministic(method):
    rng = np.random.default_rng(9)
    image = rng.normal(size=(8, 12, 12, 4)).astype(np.float32)
    # Many points land on the same pixels: the scatter-add has many colliding updates.
    grid = rng.uniform(-0.2, 0.2, size=(8, 40, 40, 2)).astype(np.float32)
    loss = lambda i, g: jnp.sum(bilinear_sample(i, g, method=method) ** 2)
    f = jax.jit(jax.grad(loss, argnums=(0, 1)))
    a, b = f(image, grid), f(image, grid)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# Batches whose flattened pixel index does not fit in int32 (B * H * W >= 2**31)
# ---------------------------------------------------------------------------------------------


def _modules_defining(name):
    """The loaded stn_jax modules that define `name` (wherever the reference code lives)."""
    import sys

    found = [m for k, m in list(sys.modules.items())
             if k.startswith("stn_jax") and m is not None and name in vars(m)]
    assert found, f"no stn_jax module defines {name}"
    return found


def test_large_batch_takes_the_per_image_index_path_at_2_31():
    # Lowered, not run: nothing of that size is allocated. Below the limit the batch is
    # flattened to (B * H * W, C) for one gather and one scatter-add; at 2**31 it must not be
    # (the int32 index would overflow), and the per-image forms are used.
    def f(image, grid):
        return bilinear_sample(image, grid, method="gather", padding_mode="reflection")

    def g(image, grid):
        return jax.grad(lambda i, g: jnp.sum(f(i, g)), argnums=(0, 1))(image, grid)

    def g_nearest(image, grid):
        return jax.grad(lambda i: jnp.sum(nearest_sample(i, grid)))(image)

    for batch, flattened in ((2**15 - 1, True), (2**15, False)):  # 256 * 256 = 2**16 pixels
        image = jax.ShapeDtypeStruct((batch, 256, 256, 1), jnp.float32)
        grid = jax.ShapeDtypeStruct((batch, 1, 2, 2), jnp.float32)
        flat_shape = f"tensor<{batch * 2**16}x1xf32>"
        for fn in (f, g, g_nearest):
            text = jax.jit(fn).lower(image, grid).as_text()
            assert (flat_shape in text) == flattened, (batch, fn.__name__)
        assert jax.eval_shape(f, image, grid).shape == (batch, 1, 2, 1)


def _nearest_reference(image, grid, cotangent, padding_mode, align_corners):
    """(out, d_image) of sum(out * cotangent) for nearest sampling, numpy float64."""
    b, h, w, c = image.shape
    g = grid.reshape(b, -1, 2)
    x, _ = _ref_coord(g[..., 0], w, padding_mode, align_corners)
    y, _ = _ref_coord(g[..., 1], h, padding_mode, align_corners)
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)  # half to even
    valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = np.zeros((b, g.shape[1], c))
    d_image = np.zeros_like(image)
    ct = cotangent.reshape(b, -1, c)
    for k, n in zip(*np.nonzero(valid)):
        out[k, n] = image[k, iy[k, n], ix[k, n]]
        d_image[k, iy[k, n], ix[k, n]] += ct[k, n]
    return out.reshape(grid.shape[:-1] + (c,)), d_image


@pytest.mark.parametrize("padding_mode,align_corners", [("zeros", False), ("reflection", True)])
def test_per_image_index_path_matches_dense_reference(monkeypatch, padding_mode, align_corners):
    # The per-image gather and scatter-add, forced on a small batch by declaring every flat
    # index too large, against the dense float64 references. The samplers are jitted per
    # shape: these shapes (float64, 3 images of 5x4x2, 14 points) are traced here first.
    rng = np.random.default_rng(14 + align_corners)
    image = rng.normal(size=(3, 5, 4, 2))
    grid = rng.uniform(-1.4, 1.4, size=(3, 2, 7, 2))
    cotangent = rng.normal(size=(3, 2, 7, 2))
    want = dense_reference(image, grid, cotangent, padding_mode, align_corners)
    want_nearest = _nearest_reference(image, grid, cotangent, padding_mode, align_corners)
    kw = dict(padding_mode=padding_mode, align_corners=align_corners)
    calls = []

    def never_fits(idx, num_pixels):
        calls.append(num_pixels)
        return None

    for module in _modules_defining("_global_index"):
        monkeypatch.setattr(module, "_global_index", never_fits)
    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in (image, grid, cotangent)]
        out = bilinear_sample(args[0], args[1], method="gather", **kw)
        grads = jax.grad(_loss, argnums=(0, 1))(*args, method="gather", **kw)
        nearest = nearest_sample(args[0], args[1], **kw)
        d_nearest = jax.grad(_loss, argnums=0)(*args, sampler=nearest_sample, **kw)
    assert len(calls) >= 4, "the per-image path was not taken"  # 2 gathers, 2 scatter-adds at least
    for got, ref in zip((out, *grads, nearest, d_nearest), want + want_nearest):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    assert np.abs(want_nearest[0]).max() > 0.5  # points do read the image


# ---------------------------------------------------------------------------------------------
# Non-finite and huge grid values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode,align_corners", CASES)
@pytest.mark.parametrize("sampler", [bilinear_sample, nearest_sample])
def test_non_finite_and_huge_grids_never_produce_nan(padding_mode, align_corners, sampler):
    image = jnp.arange(1.0, 13.0).reshape(1, 3, 4, 1)
    bad = [np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38, -3e38, 1e7, 0.5]
    pts = np.array(list(itertools.product(bad, bad)), np.float32).reshape(1, -1, 2)
    kw = dict(padding_mode=padding_mode, align_corners=align_corners)
    out = sampler(image, pts, **kw)
    d_image, d_grid = jax.grad(lambda i, g: jnp.sum(sampler(i, g, **kw)), argnums=(0, 1))(image, pts)
    for a in (out, d_image, d_grid):
        assert np.all(np.isfinite(a))
    nonfinite = ~np.all(np.isfinite(pts[0]), axis=-1)
    np.testing.assert_array_equal(out[0, nonfinite, 0], 0.0)  # documented: non-finite reads 0
    np.testing.assert_array_equal(d_grid[0, nonfinite], 0.0)
    huge = np.all(np.isfinite(pts[0]), -1) & (np.abs(pts[0]).max(-1) >= 1e7)
    if padding_mode == "zeros":
        np.testing.assert_array_equal(out[0, huge, 0], 0.0)
    if padding_mode == "border":
        # (1e30, -1e30) clamps to the top-right corner pixel.
        k = [i for i, p in enumerate(pts[0]) if p[0] == 1e30 and p[1] == -1e30][0]
        assert float(out[0, k, 0]) == 4.0
    if padding_mode == "reflection" and sampler is bilinear_sample:
        # Documented: a huge point reads some blend of image pixels (no meaningful position).
        assert np.all((out[0, huge, 0] >= 1.0) & (out[0, huge, 0] <= 12.0))


# ---------------------------------------------------------------------------------------------
# Nearest
# ---------------------------------------------------------------------------------------------


def test_nearest_rounds_half_to_even_and_has_zero_grid_gradient():
    image = jnp.arange(5.0).reshape(1, 1, 5, 1)
    # align_corners=True on width 5: x = 2 * (g + 1); x = 0.5, 1.5, 2.5, 3.4, 3.6
    xs = np.array([0.5, 1.5, 2.5, 3.4, 3.6]) / 2 - 1
    grid = jnp.asarray(np.stack([xs, np.zeros(5)], -1)[None, None], jnp.float32)
    out = nearest_sample(image, grid, align_corners=True)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0.0, 2.0, 2.0, 3.0, 4.0])
    d_image, d_grid = jax.grad(lambda i, g: jnp.sum(nearest_sample(i, g, align_corners=True)), argnums=(0, 1))(image, grid)
    np.testing.assert_array_equal(d_image[0, 0, :, 0], [1.0, 0.0, 2.0, 1.0, 1.0])
    np.testing.assert_array_equal(d_grid, 0.0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image,grid,kw,error,match",
    [
        (np.zeros((1, 4, 4, 1), np.int32), np.zeros((1, 2, 2, 2)), {}, TypeError, "image must be a float"),
        (np.zeros((1, 4, 4, 1)), np.zeros((1, 2, 2, 2), np.int32), {}, TypeError, "grid must be a float"),
        (np.zeros((4, 4, 1)), np.zeros((1, 2, 2, 2)), {}, ValueError, r"image must have rank 4 \(B, H, W, C\)"),
        (np.zeros((1, 4, 4, 1)), np.zeros((1, 2, 2, 3)), {}, ValueError, "last dimension of 2"),
        (np.zeros((2, 4, 4, 1)), np.zeros((3, 2, 2, 2)), {}, ValueError, "grid batch size 3 does not match image batch size 2"),
        (np.zeros((1, 4, 4, 1)), np.zeros((1, 2, 2, 2)), {"padding_mode": "wrap"}, ValueError, "padding_mode must be one of"),
        (np.zeros((1, 4, 4, 1)), np.zeros((1, 2, 2, 2)), {"align_corners": 1}, TypeError, "align_corners must be a bool"),
    ],
)
@pytest.mark.parametrize("sampler", [bilinear_sample, nearest_sample])
def test_bad_input_names_the_argument(image, grid, kw, error, match, sampler):
    with pytest.raises(error, match=match):
        sampler(image, grid, **kw)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        bilinear_sample(np.zeros((1, 2, 2, 1)), np.zeros((1, 1, 1, 2)), "border")


def test_help_shows_shapes_conventions_and_example():
    doc = stn_jax.bilinear_sample.__doc__
    for needle in ("(B, H, W, C)", "(B, *S, 2)", "align_corners", "Example:", "padding_mode"):
        assert needle in doc


# ---------------------------------------------------------------------------------------------
# torch.nn.functional.grid_sample (optional reference)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode,align_corners", CASES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_matches_torch_grid_sample(padding_mode, align_corners, mode):
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install torch==2.13.0 to cross-check")
    F = torch.nn.functional
    rng = np.random.default_rng(10)
    image = rng.normal(size=(3, 11, 7, 5)).astype(np.float32)
    theta = (np.eye(2, 3) + rng.normal(scale=0.4, size=(3, 2, 3))).astype(np.float32)
    grid = np.asarray(stn_jax.affine_grid(theta, (9, 13), align_corners=align_corners))
    ref_grid = F.affine_grid(torch.tensor(theta), (3, 5, 9, 13), align_corners=align_corners).numpy()
    np.testing.assert_allclose(grid, ref_grid, rtol=1e-5, atol=1e-6)
    ct = rng.normal(size=(3, 9, 13, 5)).astype(np.float32)

    t_image = torch.tensor(image).permute(0, 3, 1, 2).requires_grad_()
    t_grid = torch.tensor(grid).requires_grad_()
    t_out = F.grid_sample(t_image, t_grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    (t_out * torch.tensor(ct).permute(0, 3, 1, 2)).sum().backward()

    sampler = bilinear_sample if mode == "bilinear" else nearest_sample
    kw = dict(padding_mode=padding_mode, align_corners=align_corners, sampler=sampler)
    out = sampler(image, grid, padding_mode=padding_mode, align_corners=align_corners)
    d_image, d_grid = jax.grad(_loss, argnums=(0, 1))(image, grid, ct, **kw)
    scale = np.abs(image).max()
    np.testing.assert_allclose(out, t_out.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(d_image, t_image.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    if mode == "bilinear":
        ref = t_grid.grad.numpy()
        np.testing.assert_allclose(d_grid, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

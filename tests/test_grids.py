"""Tests of stn_jax.grids: hand-computed grids, identities, torch.affine_grid, TPS properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stn_jax
from stn_jax import grids


def test_regular_grid_hand_computed():
    np.testing.assert_allclose(
        stn_jax.regular_grid((2, 3), align_corners=True),
        [[[-1, -1], [0, -1], [1, -1]], [[-1, 1], [0, 1], [1, 1]]],
    )
    # align_corners=False: pixel centres at linspace(-1, 1, S) * (S - 1) / S.
    np.testing.assert_allclose(
        stn_jax.regular_grid((2, 3), align_corners=False),
        [[[-2 / 3, -0.5], [0, -0.5], [2 / 3, -0.5]], [[-2 / 3, 0.5], [0, 0.5], [2 / 3, 0.5]]],
        rtol=1e-6,
    )
    # Size 1 -> 0, as torch.
    np.testing.assert_array_equal(stn_jax.regular_grid((1, 1)), [[[0.0, 0.0]]])


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_hand_computed_and_linear_form(align_corners):
    theta = jnp.array([[[2.0, 0.5, 0.1], [-0.3, 1.5, -0.2]]])
    grid = stn_jax.affine_grid(theta, (3, 4), align_corners=align_corners)
    base = np.asarray(stn_jax.regular_grid((3, 4), align_corners=align_corners))
    x, y = base[..., 0], base[..., 1]
    np.testing.assert_allclose(grid[0, ..., 0], 2 * x + 0.5 * y + 0.1, rtol=1e-6)
    np.testing.assert_allclose(grid[0, ..., 1], -0.3 * x + 1.5 * y - 0.2, rtol=1e-6)
    # T = M B (Sect. 3.2) with the homogeneous basis.
    basis = stn_jax.affine_basis((3, 4), align_corners=align_corners)
    np.testing.assert_array_equal(stn_jax.linear_grid(theta, basis), grid)


@pytest.mark.filterwarnings("ignore:Since version 1.3.0")  # torch on unit-size grids
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("out_shape", [(5, 7), (1, 4), (6, 1), (28, 28)])
def test_affine_grid_matches_torch(align_corners, out_shape):
    torch = pytest.importorskip("torch", reason="torch is not installed: pip install torch==2.13.0 to cross-check")
    theta = np.random.default_rng(0).normal(size=(3, 2, 3)).astype(np.float32)
    ours = stn_jax.affine_grid(theta, out_shape, align_corners=align_corners)
    ref = torch.nn.functional.affine_grid(torch.tensor(theta), (3, 1, *out_shape), align_corners=align_corners)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_attention_grid_equals_affine_with_scale_and_translation():
    params = jnp.array([[0.5, -0.5, 0.25], [1.2, 0.0, -0.1]])
    theta = jnp.array([[[0.5, 0, -0.5], [0, 0.5, 0.25]], [[1.2, 0, 0.0], [0, 1.2, -0.1]]])
    np.testing.assert_allclose(
        stn_jax.attention_grid(params, (6, 5)), stn_jax.affine_grid(theta, (6, 5)), rtol=1e-6, atol=1e-7
    )


def test_projective_identity_and_affine_special_case():
    base = stn_jax.regular_grid((9, 11))[None]
    ident = stn_jax.identity_params("projective", batch_size=2)
    np.testing.assert_array_equal(stn_jax.projective_grid(ident, (9, 11)), jnp.broadcast_to(base, (2, 9, 11, 2)))
    # An affine matrix with last row (0, 0, 1) is the affine grid; 8 params == 3x3 form.
    theta = np.array([[0.9, 0.2, 0.1], [-0.1, 1.1, 0.3]], np.float32)
    m = np.concatenate([theta, [[0, 0, 1]]]).astype(np.float32)
    np.testing.assert_allclose(
        stn_jax.projective_grid(m[None], (4, 6)), stn_jax.affine_grid(theta[None], (4, 6)), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(
        stn_jax.projective_grid(m.reshape(1, 9)[:, :8], (4, 6)), stn_jax.projective_grid(m[None], (4, 6))
    )


def test_projective_hand_computed_division():
    # M = [[1, 0, 0], [0, 1, 0], [0.5, 0, 1]]: (x, y) -> (x, y) / (0.5 x + 1).
    params = jnp.array([[1.0, 0, 0, 0, 1, 0, 0.5, 0]])
    grid = stn_jax.projective_grid(params, (3, 3), align_corners=True)
    x = np.array([-1.0, 0.0, 1.0])
    np.testing.assert_allclose(grid[0, 0, :, 0], x / (0.5 * x + 1), rtol=1e-6)
    np.testing.assert_allclose(grid[0, 0, :, 1], -1 / (0.5 * x + 1), rtol=1e-6)


def test_projective_point_at_infinity_is_finite_with_finite_gradients():
    # w = x + 1 is 0 on the left column (x = -1 with align_corners=True).
    params = jnp.array([[1.0, 0, 0, 0, 1, 0, 1, 0]])
    grid = stn_jax.projective_grid(params, (3, 3), align_corners=True)
    assert np.all(np.isfinite(grid)) and np.abs(grid[0, :, 0, 0]).min() > 1e5
    image = jnp.ones((1, 5, 5, 2))
    loss = lambda p: jnp.sum(stn_jax.bilinear_sample(image, stn_jax.projective_grid(p, (3, 3), align_corners=True)))
    assert np.all(np.isfinite(jax.grad(loss)(params)))


def test_default_control_points_are_a_regular_lattice():
    cps = stn_jax.default_control_points(4)
    assert cps.shape == (16, 2)
    axis = np.linspace(-1, 1, 4)
    np.testing.assert_allclose(cps[:4, 0], axis, rtol=1e-6)  # x varies fastest
    np.testing.assert_allclose(cps[::4, 1], axis, rtol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
def test_tps_with_params_equal_to_control_points_is_identity(align_corners):
    cps = stn_jax.default_control_points(4)
    grid = stn_jax.tps_grid(cps[None], (13, 9), align_corners=align_corners)
    np.testing.assert_allclose(grid[0], stn_jax.regular_grid((13, 9), align_corners=align_corners), atol=1e-5)
    # The identity params from identity_params are the same thing.
    np.testing.assert_array_equal(stn_jax.identity_params("tps"), cps)


def test_tps_reproduces_affine_maps_and_interpolates_control_points():
    rng = np.random.default_rng(1)
    theta = np.eye(2, 3) + rng.normal(scale=0.2, size=(2, 3))
    with jax.enable_x64(True):
        cps = np.asarray(stn_jax.default_control_points(4, dtype=jnp.float64))
        landed = cps @ theta[:, :2].T + theta[:, 2]
        # A TPS has an exact affine part: landing points moved by an affine map give that map.
        g = stn_jax.tps_grid(jnp.asarray(landed[None], jnp.float64), (6, 7), control_points=jnp.asarray(cps, jnp.float64))
        ga = stn_jax.affine_grid(jnp.asarray(theta[None], jnp.float64), (6, 7))
        np.testing.assert_allclose(g, ga, atol=1e-10)
        # With align_corners=True a 4x4 output grid sits exactly on the control points, so the
        # spline must hit the (random) landing points there: interpolation, and r = 0 everywhere.
        params = jnp.asarray(cps + rng.normal(scale=0.1, size=cps.shape))[None]
        g = stn_jax.tps_grid(params, (4, 4), control_points=jnp.asarray(cps, jnp.float64), align_corners=True)
        np.testing.assert_allclose(g[0].reshape(16, 2), params[0], atol=1e-10)


def test_tps_is_differentiable_in_params_and_control_points_without_nan():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        cps = jnp.asarray(stn_jax.default_control_points(3, dtype=jnp.float64))
        params = cps[None] + 0.1 * jnp.asarray(rng.normal(size=(1, 9, 2)))
        weights = jnp.asarray(rng.normal(size=(1, 5, 5, 2)))

        def loss(p, c):
            # align_corners=True puts output points exactly on control points (r = 0).
            return jnp.sum(stn_jax.tps_grid(p, (5, 5), control_points=c, align_corners=True) * weights)

        # Jitted: traced control points take the jnp solve (the path a learned target grid
        # takes); one compile instead of op-by-op dispatch of its gradient (6.6 s -> 1.2 s CPU).
        d_params, d_cps = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, cps)
        assert np.all(np.isfinite(d_params)) and np.all(np.isfinite(d_cps))
        assert np.abs(d_cps).max() > 1e-3  # the target grid can be learned
        eps = 1e-6
        for idx in [(0, 0), (4, 1), (7, 0)]:
            # Concrete points here: the differences go through the float64 numpy solve.
            e = np.zeros(cps.shape)
            e[idx] = eps
            fd = (loss(params, cps + e) - loss(params, cps - e)) / (2 * eps)
            np.testing.assert_allclose(d_cps[idx], fd, rtol=1e-5, atol=1e-8)
            e = np.zeros(params.shape)
            e[(0, *idx)] = eps
            fd = (loss(params + e, cps) - loss(params - e, cps)) / (2 * eps)
            np.testing.assert_allclose(d_params[(0, *idx)], fd, rtol=1e-6, atol=1e-9)


def _thin_plate_spline_reference(control_points, values, queries):
    """An independent thin plate spline in float64 numpy: f(q) = a0 + a1 x + a2 y +
    sum_k w_k U(|q - c_k|) with U(r) = r^2 log r (zero at r = 0), (w, a) solving
    [[U(|c_i - c_j|), 1, c_i], [(1, c_j)^T, 0]] [w; a] = [values; 0] (Bookstein 1989)."""
    def u(a, b):
        r = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
        return np.where(r > 0, r**2 * np.log(np.where(r > 0, r, 1.0)), 0.0)

    k = len(control_points)
    p = np.hstack([np.ones((k, 1)), control_points])
    system = np.block([[u(control_points, control_points), p], [p.T, np.zeros((3, 3))]])
    coeffs = np.linalg.solve(system, np.vstack([values, np.zeros((3, values.shape[1]))]))
    q = np.hstack([np.ones((len(queries), 1)), queries])
    return u(queries, control_points) @ coeffs[:k] + q @ coeffs[k:]


def _pixel_centres(out_shape, align_corners):
    """Normalised (x, y) of the output pixel centres, row-major, written out by hand."""
    def axis(n):
        return (2 * np.arange(n) / (n - 1) - 1) if align_corners else (2 * np.arange(n) + 1) / n - 1
    ys, xs = np.meshgrid(axis(out_shape[0]), axis(out_shape[1]), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], -1)


@pytest.mark.parametrize("align_corners", [False, True])
def test_tps_grid_equals_an_independent_thin_plate_spline(align_corners):
    # Irregular control points and landing points: unlike the identity, an affine map or the
    # values at the control points, this pins the kernel itself (any radial kernel interpolates
    # and reproduces affine maps; only r^2 log r gives these values between the points).
    rng = np.random.default_rng(21)
    cps = rng.uniform(-1, 1, size=(7, 2))
    landed = cps + rng.normal(scale=0.3, size=(2, 7, 2))
    out_shape = (9, 6)
    want = np.stack([_thin_plate_spline_reference(cps, v, _pixel_centres(out_shape, align_corners))
                     for v in landed]).reshape(2, *out_shape, 2)
    assert np.abs(want - _pixel_centres(out_shape, align_corners).reshape(*out_shape, 2)).max() > 0.1
    try:
        from scipy.interpolate import RBFInterpolator
    except ImportError:
        RBFInterpolator = None
    if RBFInterpolator is not None:  # a second, outside implementation of the same spline
        queries = _pixel_centres(out_shape, align_corners)
        for b in range(2):
            spline = RBFInterpolator(cps, landed[b], kernel="thin_plate_spline", degree=1)
            np.testing.assert_allclose(spline(queries).reshape(*out_shape, 2), want[b], atol=1e-10)
    with jax.enable_x64(True):
        params, c = jnp.asarray(landed), jnp.asarray(cps)
        kw = dict(align_corners=align_corners)
        # Concrete control points (solved in numpy float64) and traced ones (jnp, in jit).
        concrete = stn_jax.tps_grid(params, out_shape, control_points=c, **kw)
        traced = jax.jit(lambda p, c: stn_jax.tps_grid(p, out_shape, control_points=c, **kw))(params, c)
        np.testing.assert_allclose(concrete, want, atol=1e-10)
        np.testing.assert_allclose(traced, want, atol=1e-9)
    # float32, default 4x4 lattice: to float32 rounding of the basis.
    cps = np.asarray(stn_jax.default_control_points(4), np.float64)
    landed = cps + rng.normal(scale=0.1, size=(1, 16, 2))
    want = _thin_plate_spline_reference(cps, landed[0], _pixel_centres(out_shape, align_corners))
    got = stn_jax.tps_grid(jnp.asarray(landed, jnp.float32), out_shape, **kw)
    np.testing.assert_allclose(got[0].reshape(-1, 2), want, atol=2e-6)


def _duplicate(xp):
    cps = np.asarray(stn_jax.default_control_points(3), np.float64)
    cps[4] = cps[0]
    return xp.asarray(cps)


def _collinear(xp):
    # y = 0.3 x + 0.1, rounded in the dtype of the points: on one line up to that rounding.
    t = xp.linspace(-1.0, 1.0, 5)
    return xp.stack([t, 0.3 * t + 0.1], -1)


@pytest.mark.parametrize(
    "make,match",
    [
        (_duplicate, r"control_points must be distinct: points 0 and 4"),
        (lambda xp: xp.zeros((4, 2)), r"control_points must be distinct"),
        (_collinear, r"control_points must not all lie on one line"),
        (lambda xp: xp.asarray([[0.0, 0.0], [1.0, 0.0], [0.5, np.nan]]), r"control_points must be finite"),
    ],
    ids=["duplicate", "all_equal", "collinear", "nan"],
)
def test_degenerate_tps_control_points_are_value_errors(make, match):
    # Before: a duplicate gave a grid reaching 1.9e15 and the identity stopped being one;
    # collinear points raised numpy's LinAlgError.
    points = make(jnp)
    assert points.dtype == jnp.float32
    with pytest.raises(ValueError, match=match):
        stn_jax.tps_grid(points[None], (5, 5), control_points=points)
    with pytest.raises(ValueError, match=match):
        stn_jax.tps_basis((5, 5), control_points=points)
    with pytest.raises(ValueError, match=match):
        stn_jax.identity_params("tps", control_points=points)
    with jax.enable_x64(True):  # float64 points, where the rounding tolerance is tighter
        points = jnp.asarray(make(np), jnp.float64)
        with pytest.raises(ValueError, match=match):
            stn_jax.tps_grid(points[None], (5, 5), control_points=points)


def test_nearly_degenerate_but_valid_control_points_are_accepted():
    # A triangle 1e-3 high and points 1e-4 apart are fine: the check is at float rounding.
    cps = jnp.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 1e-3], [0.5, 1e-4], [0.5001, 1e-4]])
    grid = stn_jax.tps_grid(cps[None], (4, 4), control_points=cps)
    assert np.all(np.isfinite(grid))


@pytest.mark.parametrize("kind", grids.KINDS)
def test_identity_params_give_the_regular_grid(kind):
    fn = {"affine": stn_jax.affine_grid, "attention": stn_jax.attention_grid,
          "projective": stn_jax.projective_grid, "tps": stn_jax.tps_grid}[kind]
    params = stn_jax.identity_params(kind, batch_size=3)
    grid = fn(params, (7, 5))
    assert grid.shape == (3, 7, 5, 2)
    np.testing.assert_allclose(grid, jnp.broadcast_to(stn_jax.regular_grid((7, 5)), grid.shape), atol=2e-6)


def test_identity_params_shapes():
    assert stn_jax.identity_params("affine").shape == (2, 3)
    assert stn_jax.identity_params("attention").shape == (3,)
    assert stn_jax.identity_params("projective").shape == (8,)
    assert stn_jax.identity_params("tps").shape == (16, 2)
    assert stn_jax.identity_params("tps", control_points=stn_jax.default_control_points(3), batch_size=2).shape == (2, 9, 2)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: stn_jax.identity_params("similarity"), ValueError, "kind must be one of"),
        (lambda: stn_jax.affine_grid(jnp.zeros((2, 3)), (4, 4)), ValueError, r"theta must have shape \(B, 2, 3\)"),
        (lambda: stn_jax.affine_grid(jnp.zeros((1, 2, 3)), (4,)), ValueError, "out_shape must be"),
        (lambda: stn_jax.affine_grid(jnp.zeros((1, 2, 3)), (4, 0)), ValueError, "out_shape must be"),
        (lambda: stn_jax.attention_grid(jnp.zeros((1, 4)), (4, 4)), ValueError, r"params must have shape \(B, 3\)"),
        (lambda: stn_jax.projective_grid(jnp.zeros((1, 9)), (4, 4)), ValueError, r"\(B, 8\) or \(B, 3, 3\)"),
        (lambda: stn_jax.tps_grid(jnp.zeros((1, 9, 2)), (4, 4)), ValueError, r"params must have shape \(B, 16, 2\)"),
        (lambda: stn_jax.tps_grid(jnp.zeros((1, 2, 2)), (4, 4), control_points=jnp.zeros((2, 2))), ValueError, "K >= 3"),
        (lambda: stn_jax.affine_grid(jnp.zeros((1, 2, 3), jnp.complex64), (4, 4)), TypeError, "theta must be a real float"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()

"""Tests for stn_jax.transformer.SpatialTransformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stn_jax
import stn_jax.models
from stn_jax import KINDS
from stn_jax.transformer import SpatialTransformer

B, H, W, C = 2, 12, 16, 3  # non-square, several channels: catches x/y swaps and channel mixups
LOC_FEATURES = 8
# The core snaps coordinates within float rounding of an integer, so identity warps are exact
# (measured 0) and a 2x2 average is off by float32 summation (measured 6.9e-7). The TPS basis
# comes from a float32 linear solve: its identity grid is off by ~1e-6 (measured 1.4e-5 in the
# output).
ATOL = {"affine": 1e-6, "attention": 1e-6, "projective": 1e-6, "tps": 3e-5}


class TinyLoc(nnx.Module):
    """Flatten -> Linear -> tanh: features that really depend on the input."""

    def __init__(self, in_features, *, rngs):
        self.fc = nnx.Linear(in_features, LOC_FEATURES, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.fc(x.reshape(x.shape[0], -1)))


def make_st(kind, out_shape=(H, W), *, seed=0, **kw):
    rngs = nnx.Rngs(seed)
    return SpatialTransformer(TinyLoc(H * W * C, rngs=rngs), loc_features=LOC_FEATURES, kind=kind,
                              out_shape=out_shape, rngs=rngs, **kw)


def images(seed=0, shape=(B, H, W, C)):
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


# Jitted: one compile per module structure is several times faster than eager op-by-op dispatch.
apply = nnx.jit(lambda st, x: st(x))


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_leaves_input_unchanged(kind):
    st = make_st(kind)
    x = images()
    out, theta = apply(st, x)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, x, atol=ATOL[kind], rtol=0)
    np.testing.assert_allclose(theta, stn_jax.identity_params(kind, batch_size=B), atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_with_align_corners_and_nearest(kind):
    x = images(1)
    out, _ = apply(make_st(kind, align_corners=True), x)
    np.testing.assert_allclose(out, x, atol=ATOL[kind], rtol=0)
    # Nearest rounds the (nearly integer) identity coordinates back onto the pixels: exact.
    out, _ = apply(make_st(kind, sampler="nearest"), x)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_downsampling_by_two_is_a_2x2_average(kind):
    # With align_corners=False, output pixel i of a half-size identity grid reads input
    # coordinate ((2i+1)/W' * W - 1)/2 = 2i + 0.5: the centre of a 2x2 block, so bilinear
    # sampling averages that block.
    x = images(2)
    out, _ = apply(make_st(kind, out_shape=(H // 2, W // 2)), x)
    expected = x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))
    np.testing.assert_allclose(out, expected, atol=ATOL[kind], rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_theta_and_grid_shapes(kind):
    st = make_st(kind, out_shape=(5, 7))
    out, theta = apply(st, images())
    natural = {"affine": (B, 2, 3), "attention": (B, 3), "projective": (B, 8), "tps": (B, 16, 2)}
    assert theta.shape == natural[kind]
    assert out.shape == (B, 5, 7, C)
    assert st.grid(theta).shape == (B, 5, 7, 2)


SHIFT_BY_ONE_PIXEL = {  # read input column j+1 for output column j: tx = 2/W in normalised x
    "affine": [[1.0, 0.0, 2 / W], [0.0, 1.0, 0.0]],
    "attention": [1.0, 2 / W, 0.0],
    "projective": [1.0, 0.0, 2 / W, 0.0, 1.0, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("kind", KINDS)
def test_bias_drives_the_transform(kind):
    """Set the regression bias to a one-pixel shift: the output is the input moved left by 1."""
    st = make_st(kind)
    if kind == "tps":
        shift = stn_jax.identity_params("tps") + jnp.array([2 / W, 0.0])
    else:
        shift = jnp.array(SHIFT_BY_ONE_PIXEL[kind])
    st.regression.bias[...] = shift.reshape(-1)
    x = images(3)
    out, theta = apply(st, x)
    np.testing.assert_allclose(theta[0], shift, atol=1e-7)
    np.testing.assert_allclose(out[:, :, :-1], x[:, :, 1:], atol=ATOL[kind], rtol=0)
    np.testing.assert_allclose(out[:, :, -1], 0.0, atol=ATOL[kind])  # zeros padding


@pytest.mark.parametrize("sampler", ["bilinear", "nearest"])
def test_padding_mode_and_align_corners_reach_the_sampler(sampler):
    # A zoom-out by 2 with a shift reads far outside the input, where the three padding modes
    # differ: each module's output is the sampler's with its own options, and no two agree.
    theta = jnp.array([[2.0, 0.3, 0.4], [-0.2, 2.0, -0.3]])
    x = images(4)
    grid = stn_jax.affine_grid(jnp.broadcast_to(theta, (B, 2, 3)), (H, W), align_corners=True)
    fn = stn_jax.bilinear_sample if sampler == "bilinear" else stn_jax.nearest_sample
    outs = {}
    for mode in ("zeros", "border", "reflection"):
        st = make_st("affine", padding_mode=mode, align_corners=True, sampler=sampler)
        st.regression.bias[...] = theta.reshape(-1)
        outs[mode], _ = apply(st, x)
        # Jitted inside the module, eager here: float32 rounding apart (measured 1.0e-6).
        np.testing.assert_allclose(outs[mode], fn(x, grid, padding_mode=mode, align_corners=True),
                                   atol=1e-5, rtol=0)
    for a, b in (("zeros", "border"), ("zeros", "reflection"), ("border", "reflection")):
        assert np.abs(outs[a] - outs[b]).max() > 0.1, (a, b)


def test_custom_tps_control_points():
    cp = jnp.stack(jnp.meshgrid(jnp.linspace(-1, 1, 3), jnp.linspace(-1, 1, 3), indexing="xy"),
                   -1).reshape(-1, 2)
    st = make_st("tps", control_points=cp)
    x = images(4)
    out, theta = apply(st, x)
    assert theta.shape == (B, 9, 2)
    np.testing.assert_allclose(theta[1], cp, atol=0)
    np.testing.assert_allclose(out, x, atol=ATOL["tps"], rtol=0)


def test_learned_tps_control_points_are_params_with_correct_gradients():
    st = make_st("tps", learn_control_points=True)
    fixed = make_st("tps")
    k = stn_jax.default_control_points().shape[0]
    assert stn_jax.models.count_params(st) == stn_jax.models.count_params(fixed) + 2 * k
    np.testing.assert_array_equal(st.control_point_param[...], stn_jax.default_control_points())
    x = images(8)
    out, _ = apply(st, x)
    np.testing.assert_allclose(out, x, atol=ATOL["tps"], rtol=0)  # still the identity at init
    # Pull theta away from the control points, so that moving them changes the grid.
    st.regression.bias[...] = st.regression.bias[...] + 0.1 * jax.random.normal(
        jax.random.key(3), st.regression.bias.shape)
    target = jnp.roll(x, 1, axis=1)
    grads = _grad(st, x, target)
    g = grads["control_point_param"][...]
    assert g.shape == (k, 2) and np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 1e-4
    # A small step against the gradient lowers the loss (the sampler's kinks make a finite
    # difference of the loss itself unreliable in float32) ...
    base = st.control_point_param[...]
    loss0 = float(_loss(st, x, target))
    st.control_point_param[...] = base - 1e-2 * g / jnp.abs(g).max()
    assert float(_loss(st, x, target)) < loss0
    st.control_point_param[...] = base
    # ... and the grid, smooth in the control points, matches a central difference.
    theta = st.theta(x)
    weights = jax.random.normal(jax.random.key(5), (B,) + st.out_shape + (2,))

    def grid_dot(cp):
        st.control_point_param[...] = cp
        return jnp.sum(st.grid(theta) * weights)

    direction = jax.random.normal(jax.random.key(4), (k, 2))
    eps = 1e-2
    fd = (float(grid_dot(base + eps * direction)) - float(grid_dot(base - eps * direction))) / (
        2 * eps)
    # Jitted: eager forward mode through the traced solve dispatches op by op (3.2 s of CPU).
    _, jvp = jax.jit(lambda cp, d: jax.jvp(
        lambda c: stn_jax.tps_grid(theta, st.out_shape, control_points=c), (cp,), (d,)))(
            base, direction)
    st.control_point_param[...] = base
    np.testing.assert_allclose(fd, float(jnp.sum(jvp * weights)), rtol=1e-3)
    with pytest.raises(ValueError, match="learn_control_points=True needs kind='tps'"):
        make_st("affine", learn_control_points=True)


def _loss(st, x, target):
    out, _ = st(x)
    return jnp.mean((out - target) ** 2)


_grad = nnx.jit(nnx.grad(_loss))


def sgd_step(st, x, target, lr=0.01):
    grads = _grad(st, x, target)
    params = nnx.state(st, nnx.Param)
    nnx.update(st, jax.tree.map(lambda p, g: p - lr * g, params, grads))
    return grads


@pytest.mark.parametrize("kind", ["affine", "tps"])
def test_gradients_reach_regression_then_localisation(kind):
    st = make_st(kind)
    x = images(5)
    target = jnp.roll(x, 1, axis=2)  # a shift the ST can learn
    g1 = sgd_step(st, x, target)
    # Step 1: the regression kernel is zero, so the gradient stops there; its own is not zero.
    assert float(jnp.abs(g1["regression"]["kernel"][...]).max()) > 1e-3
    np.testing.assert_array_equal(g1["localization"]["fc"]["kernel"][...], 0.0)
    assert float(jnp.abs(st.regression.kernel[...]).max()) > 1e-5
    # Step 2: with a non-zero kernel the loss now reaches the localisation net.
    g2 = sgd_step(st, x, target)
    assert float(jnp.abs(g2["localization"]["fc"]["kernel"][...]).max()) > 1e-6
    # The step lowers the loss: theta moved towards the shift.
    assert float(_loss(st, x, target)) < float(_loss(make_st(kind), x, target))


def test_jit_of_split_merge_equals_eager():
    kind = "tps"  # the longest path: a linear solve in the grid, then the sampler
    st = make_st(kind, out_shape=(6, 8))
    # A non-identity state, so the comparison is not of two copies of the input.
    st.regression.kernel[...] = 0.05 * jax.random.normal(jax.random.key(7),
                                                         st.regression.kernel.shape)
    x = images(6)
    eager_out, eager_theta = st(x)
    graphdef, state = nnx.split(st)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    out, theta = forward(state, x)
    assert float(jnp.abs(eager_theta - stn_jax.identity_params(kind, batch_size=B)).max()) > 1e-3
    np.testing.assert_allclose(out, eager_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(theta, eager_theta, atol=1e-6, rtol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kind must be one of.*affine.*attention.*projective"):
        make_st("similarity")
    with pytest.raises(ValueError, match="sampler"):
        make_st("affine", sampler="bicubic")
    with pytest.raises(ValueError, match="padding_mode"):
        make_st("affine", padding_mode="wrap")
    with pytest.raises(ValueError, match="out_shape"):
        make_st("affine", out_shape=(4,))
    with pytest.raises(ValueError, match="control_points applies to kind='tps' only"):
        make_st("affine", control_points=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="control_points must have shape"):
        make_st("tps", control_points=jnp.zeros((4, 3)))
    st = make_st("affine")
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, W, C\)"):
        st(jnp.zeros((H, W, C)))
    wrong = SpatialTransformer(TinyLoc(H * W * C, rngs=nnx.Rngs(0)), loc_features=5,
                               kind="affine", out_shape=(H, W), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="loc_features"):
        wrong(images())

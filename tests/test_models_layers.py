"""stn_jax.models.layers: the im2col convolution and the 2x2 max-pool equal the standard ops.

References are `jax.lax.conv_general_dilated` and `nnx.max_pool` (values and gradients, float64
where the comparison should be exact up to summation order), plus hand-computed values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stn_jax.models import layers

DN = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, k, padding="VALID", **kw):
    return jax.lax.conv_general_dilated(x, k, kw.pop("strides", (1, 1)), padding,
                                        dimension_numbers=DN, **kw)


def _random(shape, seed, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# Shapes of the MNIST models (1-channel 9x9, the 7x7 kernel covering its whole 7x7 input, the
# localisation net's 5x5 convs), plus non-square inputs and kernels and explicit padding.
CASES = [
    ((2, 21, 21, 1), (9, 9, 1, 5), "VALID"),
    ((2, 7, 7, 6), (7, 7, 6, 5), "VALID"),
    ((3, 9, 9, 4), (5, 5, 4, 3), "VALID"),
    ((2, 11, 8, 3), (4, 3, 3, 2), "VALID"),
    ((2, 6, 5, 2), (3, 3, 2, 4), ((1, 2), (0, 1))),
    ((2, 5, 5, 2), (7, 7, 2, 3), ((1, 1), (1, 1))),  # padded input exactly covered: dense case
]


@pytest.mark.parametrize("x_shape,k_shape,padding", CASES)
def test_patches_conv_equals_lax_conv_values_and_gradients(x_shape, k_shape, padding):
    with jax.enable_x64(True):
        x, k = _random(x_shape, 0), _random(k_shape, 1)
        pads = padding if padding != "VALID" else ((0, 0), (0, 0))
        ref, ref_vjp = jax.vjp(lambda x, k: _lax_conv(x, k, padding), x, k)
        out, out_vjp = jax.vjp(lambda x, k: layers.patches_conv(x, k, pads), x, k)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
        ct = _random(ref.shape, 2)
        for got, want in zip(out_vjp(ct), ref_vjp(ct)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_patches_conv_hand_computed():
    # 1x3x3 input 1..9, 2x2 kernel [[1, 0], [0, -1]]: out[i, j] = x[i, j] - x[i+1, j+1] = -4.
    x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    k = jnp.array([[1.0, 0.0], [0.0, -1.0]]).reshape(2, 2, 1, 1)
    np.testing.assert_array_equal(layers.patches_conv(x, k)[0, :, :, 0], [[-4, -4], [-4, -4]])


def _count_convolutions(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text().count(" convolution(")


def test_conv_general_dilated_takes_patches_on_cpu_and_xla_otherwise():
    x, k = jnp.ones((2, 12, 12, 3), jnp.float32), jnp.ones((3, 3, 3, 4), jnp.float32)
    plain = lambda x, k: layers.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN)
    assert jax.default_backend() == "cpu"
    assert _count_convolutions(plain, x, k) == 0
    assert _count_convolutions(jax.grad(lambda x, k: jnp.sum(plain(x, k)), (0, 1)), x, k) == 0
    # Strided, dilated, grouped and SAME convolutions are XLA's own, with the same result.
    others = [
        dict(window_strides=(2, 2), padding="VALID"),
        dict(window_strides=(1, 1), padding="SAME"),
        dict(window_strides=(1, 1), padding="VALID", rhs_dilation=(2, 2)),
    ]
    for kw in others:
        fn = lambda x, k, kw=kw: layers.conv_general_dilated(x, k, dimension_numbers=DN, **kw)
        assert _count_convolutions(fn, x, k) == 1, kw
        np.testing.assert_array_equal(
            fn(x, k), jax.lax.conv_general_dilated(x, k, dimension_numbers=DN, **kw))
    grouped = lambda x, k: layers.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=DN, feature_group_count=3)
    kg = jnp.ones((3, 3, 1, 3), jnp.float32)  # one input channel per group
    assert _count_convolutions(grouped, x, kg) == 1
    np.testing.assert_array_equal(grouped(x, kg), jax.lax.conv_general_dilated(
        x, kg, (1, 1), "VALID", dimension_numbers=DN, feature_group_count=3))


def test_conv_general_dilated_falls_back_above_max_patch_bytes(monkeypatch):
    x, k = jnp.ones((2, 12, 12, 3), jnp.float32), jnp.ones((3, 3, 3, 4), jnp.float32)
    patch_bytes = 2 * 10 * 10 * 3 * 3 * 3 * 4
    for limit, convolutions in [(patch_bytes - 1, 1), (patch_bytes, 0)]:
        monkeypatch.setattr(layers, "MAX_PATCH_BYTES", limit)
        # A new function each time: jit caches traces by function.
        fn = lambda x, k: layers.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN)
        assert _count_convolutions(fn, x, k) == convolutions, limit


# A convolution with >= XLA_INPUT_GRAD_MIN_CHANNELS input channels and >= XLA_INPUT_GRAD_MIN_PIXELS
# output pixels: on the CPU its input derivative is XLA's convolution (the TC CNN's 7x7 conv).
WIDE_X, WIDE_K = (2, 14, 13, 16), (3, 4, 16, 3)


def _wide_conv(x, k, padding=((1, 0), (0, 2))):
    return layers.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=DN)


def test_wide_conv_takes_xla_for_its_input_gradient_only():
    x, k = jnp.ones(WIDE_X, jnp.float32), jnp.ones(WIDE_K, jnp.float32)
    assert 12 * 14 >= layers.XLA_INPUT_GRAD_MIN_PIXELS
    assert _count_convolutions(_wide_conv, x, k) == 0
    # One convolution in the input gradient; the kernel gradient stays a matmul of the patches.
    assert _count_convolutions(jax.grad(lambda x, k: jnp.sum(_wide_conv(x, k))), x, k) == 1
    assert _count_convolutions(
        jax.grad(lambda x, k: jnp.sum(_wide_conv(x, k)), argnums=1), x, k) == 0


def test_wide_conv_equals_lax_conv_values_gradients_and_jvp():
    with jax.enable_x64(True):
        x, k = _random(WIDE_X, 20), _random(WIDE_K, 21)
        padding = ((1, 0), (0, 2))
        ref, ref_vjp = jax.vjp(lambda x, k: _lax_conv(x, k, padding), x, k)
        out, out_vjp = jax.vjp(_wide_conv, x, k)
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
        ct = _random(ref.shape, 22)
        for got, want in zip(out_vjp(ct), ref_vjp(ct)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        # Forward mode, in both arguments and in one at a time (the other a symbolic zero).
        tx, tk = _random(WIDE_X, 23), _random(WIDE_K, 24)
        for tangents in [(tx, tk), (tx, jnp.zeros_like(tk)), (jnp.zeros_like(tx), tk)]:
            _, got = jax.jvp(_wide_conv, (x, k), tangents)
            _, want = jax.jvp(lambda x, k: _lax_conv(x, k, padding), (x, k), tangents)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        _, got = jax.jvp(lambda k: _wide_conv(x, k), (k,), (tk,))
        _, want = jax.jvp(lambda k: _lax_conv(x, k, padding), (k,), (tk,))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_wide_conv_grad_of_grad_matches_finite_differences():
    # d/dk of <grad_x loss, v>: second order through the XLA input derivative, in float64.
    with jax.enable_x64(True):
        x, k, v = _random(WIDE_X, 25), _random(WIDE_K, 26), _random(WIDE_X, 27)
        dk = _random(WIDE_K, 28)

        def inner(k):
            gx = jax.grad(lambda x: jnp.sum(jnp.tanh(_wide_conv(x, k))))(x)
            return jnp.vdot(gx, v)

        got = jnp.vdot(jax.grad(inner)(k), dk)
        eps = 1e-6
        want = (inner(k + eps * dk) - inner(k - eps * dk)) / (2 * eps)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_nnx_conv_with_patches_equals_default_conv():
    kwargs = dict(kernel_size=(5, 5), padding="VALID", rngs=nnx.Rngs(3))
    ours = nnx.Conv(2, 7, conv_general_dilated=layers.conv_general_dilated, **kwargs)
    theirs = nnx.Conv(2, 7, **dict(kwargs, rngs=nnx.Rngs(3)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 13, 11, 2)), jnp.float32)
    np.testing.assert_array_equal(ours.kernel[...], theirs.kernel[...])
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (2, 13, 13, 4), (1, 7, 4, 2), (3, 1, 1, 1)])
def test_max_pool_2x2_equals_nnx_max_pool(shape):
    x = _random(shape, 4, jnp.float32)
    ref_fn = lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    ref, ref_vjp = jax.vjp(ref_fn, x)
    out, out_vjp = jax.vjp(layers.max_pool_2x2, x)
    np.testing.assert_array_equal(out, ref)
    ct = _random(ref.shape, 5, jnp.float32)
    np.testing.assert_array_equal(out_vjp(ct)[0], ref_vjp(ct)[0])  # no ties in random data


def test_max_pool_2x2_hand_computed_and_ties():
    x = jnp.array([[1.0, 3.0, 5.0], [2.0, 0.0, -1.0], [7.0, 7.0, 4.0]]).reshape(1, 3, 3, 1)
    np.testing.assert_array_equal(layers.max_pool_2x2(x)[0, :, :, 0], [[3, 5], [7, 4]])
    g = jax.grad(lambda x: jnp.sum(layers.max_pool_2x2(x)))(x)[0, :, :, 0]
    # Each window's gradient goes to its maximum; of the tie (7, 7), to the first.
    np.testing.assert_array_equal(g, [[0, 1, 1], [0, 0, 0], [1, 0, 1]])


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (2, 13, 13, 4), (1, 7, 4, 2)])
def test_max_pool_2x2_ties_equal_nnx_max_pool(shape):
    # Few distinct values: most windows hold ties, and whole windows of one value (the zeros
    # of a blank background after a ReLU, say) tie four ways.
    x = jnp.asarray(np.random.default_rng(6).integers(0, 3, size=shape), jnp.float32)
    ref_fn = lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    ct = _random(ref_fn(x).shape, 7, jnp.float32)
    np.testing.assert_array_equal(jax.vjp(layers.max_pool_2x2, x)[1](ct)[0],
                                  jax.vjp(ref_fn, x)[1](ct)[0])


def test_max_pool_2x2_grad_of_grad():
    x = _random((2, 5, 6, 3), 8, jnp.float32)
    hvp = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(layers.max_pool_2x2(x) ** 2))(x)))
    ref = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(
        nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME") ** 2))(x)))
    np.testing.assert_allclose(hvp(x), ref(x), rtol=1e-6)


def test_max_pool_2x2_rejects_wrong_rank():
    with pytest.raises(ValueError, match="rank 4"):
        layers.max_pool_2x2(jnp.ones((3, 3)))


def _nnx_pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (1, 7, 4, 2)])
def test_max_pool_2x2_jvp_matches_finite_differences(shape):
    # Forward mode: the pool is piecewise linear, so away from ties (random float64 data) a
    # central difference is exact to rounding. jacfwd and jacrev agree entry for entry.
    with jax.enable_x64(True):
        x = _random(shape, 9)
        v = _random(shape, 10)
        out, tangent = jax.jvp(layers.max_pool_2x2, (x,), (v,))
        eps = 1e-6
        fd = (layers.max_pool_2x2(x + eps * v) - layers.max_pool_2x2(x - eps * v)) / (2 * eps)
        np.testing.assert_allclose(tangent, fd, rtol=1e-8, atol=1e-8)
        np.testing.assert_array_equal(out, _nnx_pool(x))
        assert np.abs(tangent).max() > 0.5  # the comparison is not vacuous
        np.testing.assert_array_equal(jax.jacfwd(layers.max_pool_2x2)(x),
                                      jax.jacrev(layers.max_pool_2x2)(x))


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (1, 7, 4, 2)])
def test_max_pool_2x2_jvp_equals_nnx_max_pool_with_ties(shape):
    x = jnp.asarray(np.random.default_rng(11).integers(0, 3, size=shape), jnp.float32)
    v = _random(shape, 12, jnp.float32)
    np.testing.assert_array_equal(jax.jvp(layers.max_pool_2x2, (x,), (v,))[1],
                                  jax.jvp(_nnx_pool, (x,), (v,))[1])


def _exported_ops(fn, x, platform):
    text = jax.export.export(jax.jit(fn), platforms=(platform,))(x).mlir_module()
    # Op names only: the text's source locations name functions too.
    return text.count("stablehlo.reduce_window"), text.count("stablehlo.select_and_scatter")


def test_max_pool_2x2_takes_reduce_window_off_cpu():
    # The platform is chosen at lowering, like the convolution's: lowered for the CPU the pool
    # and its derivatives hold no reduce_window or select_and_scatter; lowered for a GPU or TPU
    # (exported without one) they are XLA's own.
    x = jnp.ones((2, 7, 6, 3), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(layers.max_pool_2x2(x) ** 2))
    jvp = lambda x: jax.jvp(layers.max_pool_2x2, (x,), (x,))[1]  # noqa: E731
    assert _exported_ops(layers.max_pool_2x2, x, "cpu") == (0, 0)
    assert _exported_ops(grad, x, "cpu") == (0, 0)
    assert _exported_ops(jvp, x, "cpu") == (0, 0)
    for platform in ("cuda", "tpu"):
        assert _exported_ops(layers.max_pool_2x2, x, platform)[0] > 0, platform
        assert _exported_ops(grad, x, platform)[1] > 0, platform
        assert _exported_ops(jvp, x, platform)[0] > 0, platform


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (1, 7, 5, 2)])
def test_max_pool_2x2_off_cpu_form_equals_nnx_max_pool(shape):
    # What the accelerators run, run here: values, gradient, jvp and grad of grad.
    x = _random(shape, 13, jnp.float32)
    v = _random(shape, 14, jnp.float32)
    pool = layers._xla_max_pool_2x2
    np.testing.assert_array_equal(pool(x), _nnx_pool(x))
    np.testing.assert_array_equal(jax.jvp(pool, (x,), (v,))[1], jax.jvp(_nnx_pool, (x,), (v,))[1])
    np.testing.assert_array_equal(jax.jvp(pool, (x,), (v,))[1],
                                  jax.jvp(layers.max_pool_2x2, (x,), (v,))[1])
    loss = lambda f: lambda x: jnp.sum(f(x) ** 3)  # noqa: E731
    np.testing.assert_array_equal(jax.grad(loss(pool))(x), jax.grad(loss(_nnx_pool))(x))
    np.testing.assert_allclose(jax.hessian(loss(pool))(x[:1, :4, :4, :1]),
                               jax.hessian(loss(layers.max_pool_2x2))(x[:1, :4, :4, :1]), rtol=1e-6)

"""Tests for stn_jax.models.mnist: the Table-1 models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import stn_jax
from stn_jax.models import mnist

# (input shape, st_downsample) of the Table-1 data sets: R/P/E, RTS, TC.
SETUPS = [((28, 28, 1), 1), ((42, 42, 1), 2), ((60, 60, 1), 2)]
TRANSFORMS = ("affine", "projective", "tps")
VARIANTS = [("fcn", None), ("cnn", None)] + [
    (name, t) for name in ("st_fcn", "st_cnn") for t in TRANSFORMS]
THETA_SHAPE = {"affine": (2, 3), "projective": (8,), "tps": (16, 2)}


def abstract_model(name, transform, shape, ds, **kw):
    """The model with ShapeDtypeStruct leaves: no initialisation, no compile."""
    return nnx.eval_shape(lambda: mnist.create_model(
        name, transform=transform or "affine", input_shape=shape, st_downsample=ds,
        rngs=nnx.Rngs(0), **kw))


def test_feature_shapes_by_hand():
    # conv9 valid -> ceil pool2 -> conv7 valid -> ceil pool2
    assert mnist.cnn_feature_shape((28, 28)) == (2, 2)  # 20 -> 10 -> 4 -> 2
    assert mnist.cnn_feature_shape((21, 21)) == (1, 1)  # 13 -> 7 -> 1 -> 1 (ceil mode)
    assert mnist.cnn_feature_shape((30, 42)) == (3, 6)  # 22 -> 11 -> 5 -> 3; 34 -> 17 -> 11 -> 6
    assert mnist.cnn_feature_shape((60, 60)) == (10, 10)  # 52 -> 26 -> 20 -> 10
    with pytest.raises(ValueError, match="too small for the CNN"):
        mnist.cnn_feature_shape((20, 28))
    # ceil pool2 -> conv5 valid -> ceil pool2 -> conv5 valid
    assert mnist.loc_cnn_feature_shape((28, 28)) == (1, 1)  # 14 -> 10 -> 5 -> 1
    assert mnist.loc_cnn_feature_shape((42, 42)) == (5, 5)  # 21 -> 17 -> 9 -> 5
    assert mnist.loc_cnn_feature_shape((60, 60)) == (9, 9)  # 30 -> 26 -> 13 -> 9
    with pytest.raises(ValueError, match="too small for the ST-CNN localisation"):
        mnist.loc_cnn_feature_shape((24, 24))


def test_max_pool_is_ceil_mode():
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    np.testing.assert_array_equal(mnist._max_pool2(x)[0, ..., 0], [[4.0, 5.0], [7.0, 8.0]])
    # Negative values: the padding must not win (it is -inf, not 0).
    np.testing.assert_array_equal(mnist._max_pool2(-x - 1)[0, ..., 0],
                                  [[-1.0, -3.0], [-7.0, -9.0]])


def test_parameter_counts_match_across_models():
    """Prints the table (pytest -s); every model is within 2% of its input shape's budget."""
    fcn_28 = 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert mnist.target_param_count((28, 28)) == fcn_28 == 118_282
    header = ("input", "model", "transform", "width", "params", "vs target")
    print("\n{:>8} {:>8} {:>10} {:>6} {:>8} {:>9}".format(*header))
    for shape, ds in SETUPS:
        target = mnist.target_param_count(shape)
        counts = []
        for name, transform in VARIANTS:
            model = abstract_model(name, transform, shape, ds)
            n = mnist.count_params(model)
            closed_form = mnist.param_count(name, model.width, transform=transform or "affine",
                                            input_shape=shape, st_downsample=ds)
            assert n == closed_form, (name, transform, shape)
            counts.append(n)
            print(f"{shape[0]}x{shape[1]:<5} {name:>8} {transform or '-':>10} {model.width:>6} "
                  f"{n:>8} {100 * (n - target) / target:>+8.2f}%")
            assert abs(n - target) <= 0.02 * target, (name, transform, shape, n, target)
        assert max(counts) <= 1.1 * min(counts)


@pytest.mark.parametrize("name,transform", [("st_fcn", "tps"), ("st_cnn", "affine"),
                                            ("cnn", None)])
def test_solved_width_is_the_closest(name, transform):
    for shape, ds in SETUPS:
        kw = dict(transform=transform or "affine", input_shape=shape, st_downsample=ds)
        target = mnist.target_param_count(shape)
        w = mnist.solve_width(name, **kw)
        miss = [abs(mnist.param_count(name, v, **kw) - target) for v in (w - 1, w, w + 1)]
        assert miss[1] <= min(miss[0], miss[2]), (shape, w, miss)
    assert mnist.solve_width("fcn", input_shape=(60, 60)) == 128
    assert mnist.solve_width("fcn", input_shape=(60, 60), reference_width=64) == 64


@pytest.mark.parametrize("shape,ds", SETUPS)
def test_shapes_of_every_model(shape, ds):
    batch = 3
    x = jax.ShapeDtypeStruct((batch,) + shape, jnp.float32)
    for name, transform in VARIANTS:
        model = abstract_model(name, transform, shape, ds)
        graphdef, state = nnx.split(model)
        logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
        assert logits.shape == (batch, 10) and logits.dtype == jnp.float32
        assert model.has_transformer == name.startswith("st_")
        if model.has_transformer:
            out, theta, grid = jax.eval_shape(
                lambda s, x: nnx.merge(graphdef, s).spatial_transform(x), state, x)
            small = (shape[0] // ds, shape[1] // ds)
            assert out.shape == (batch,) + small + (1,)
            assert theta.shape == (batch,) + THETA_SHAPE[transform]
            assert grid.shape == (batch,) + small + (2,)


def test_two_channels_and_other_class_counts():
    # The MNIST-addition input: two 42x42 channels, 19 classes.
    model = abstract_model("st_cnn", "affine", (42, 42, 2), 2, num_classes=19)
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                            jax.ShapeDtypeStruct((2, 42, 42, 2), jnp.float32))
    assert logits.shape == (2, 19)
    n = mnist.count_params(model)
    target = mnist.target_param_count((42, 42, 2), num_classes=19)
    assert abs(n - target) <= 0.02 * target


def test_st_model_at_init_is_its_head_on_the_identity_resampled_input():
    x = jax.random.uniform(jax.random.key(0), (2, 42, 42, 1))
    model = mnist.create_model("st_cnn", transform="tps", input_shape=(42, 42), st_downsample=2,
                               rngs=nnx.Rngs(1))
    logits, (out, theta, grid) = nnx.jit(lambda m, x: (m(x), m.spatial_transform(x)))(model, x)
    # A half-size identity grid reads the centre of each 2x2 block (align_corners=False).
    pooled = x.reshape(2, 21, 2, 21, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(out, pooled, atol=3e-5)  # 3e-5: the core's float32 TPS solve
    np.testing.assert_allclose(theta, stn_jax.identity_params("tps", batch_size=2), atol=0)
    np.testing.assert_allclose(grid[0], stn_jax.regular_grid((21, 21)), atol=2e-6)
    np.testing.assert_allclose(logits, nnx.jit(lambda m, x: m.head(x))(model, pooled),
                               atol=1e-4, rtol=1e-4)


def _ce_loss(model, x, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


@jax.jit
def _sgd_step(graphdef, params, x, labels):
    def loss_fn(p):
        return _ce_loss(nnx.merge(graphdef, p), x, labels)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, grads, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)


def test_classification_loss_trains_the_transformer():
    model = mnist.create_model("st_cnn", transform="affine", input_shape=(28, 28),
                               rngs=nnx.Rngs(2))
    x = jax.random.uniform(jax.random.key(3), (8, 28, 28, 1))
    labels = jnp.arange(8) % 10
    graphdef, params = nnx.split(model)
    loss0, g1, params = _sgd_step(graphdef, params, x, labels)
    st = g1["transformer"]
    # Step 1: the zero regression kernel blocks the localisation net; the kernel itself learns.
    assert float(jnp.abs(st["regression"]["kernel"][...]).max()) > 0
    np.testing.assert_array_equal(st["localization"]["conv1"]["kernel"][...], 0.0)
    # Step 2: the loss reaches the first conv of the localisation net.
    loss1, g2, params = _sgd_step(graphdef, params, x, labels)
    assert float(jnp.abs(g2["transformer"]["localization"]["conv1"]["kernel"][...]).max()) > 0
    theta = nnx.merge(graphdef, params).transformer.theta(x)
    assert float(jnp.abs(theta - stn_jax.identity_params("affine")).max()) > 1e-6
    assert float(loss1) < float(loss0)


def test_jit_of_split_merge_equals_eager():
    model = mnist.create_model("st_fcn", transform="projective", input_shape=(28, 28),
                               rngs=nnx.Rngs(4))
    kernel = model.transformer.regression.kernel
    kernel[...] = 0.01 * jax.random.normal(jax.random.key(5), kernel.shape)  # not the identity
    x = jax.random.uniform(jax.random.key(6), (2, 28, 28, 1))
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(jitted, model(x), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise():
    choices = r"name must be one of \('fcn', 'cnn', 'st_fcn', 'st_cnn'\)"
    with pytest.raises(ValueError, match=choices):
        mnist.create_model("resnet", input_shape=(28, 28), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="transform must be one of"):
        mnist.create_model("st_fcn", transform="rigid", input_shape=(28, 28), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_shape"):
        mnist.create_model("fcn", input_shape=(28,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="st_downsample=4 must divide"):
        mnist.create_model("st_fcn", input_shape=(42, 42), st_downsample=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="localisation net does not fit"):
        mnist.create_model("st_fcn", input_shape=(60, 60), reference_width=8, rngs=nnx.Rngs(0))
    model = abstract_model("fcn", None, (28, 28, 1), 1)
    with pytest.raises(ValueError, match="no spatial transformer"):
        model.spatial_transform(jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 28, 28, 1\)"):
        model(jnp.zeros((1, 28, 28)))

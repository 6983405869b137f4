"""CUB models: the tiling start of the parallel attention transformers, shapes, train steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stn_jax.models import backbones
from stn_jax.models import count_params
from stn_jax.models import cub as cub_models
from stn_jax.train.state import transformer_labels


# One batch size (4) and image size (64) throughout: eager calls compile each op once per
# shape, and the models share those compiles only when the shapes agree (a SqueezeNet forward
# at a new batch size costs 6 s of CPU in compiles).
def _images(n, size, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)),
                       jnp.float32)


def test_tiling_centres():
    np.testing.assert_array_equal(cub_models.tiling_centres(1), [[0, 0]])
    np.testing.assert_array_equal(cub_models.tiling_centres(2), [[-0.5, 0], [0.5, 0]])
    np.testing.assert_array_equal(cub_models.tiling_centres(4),
                                  [[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="num must be"):
        cub_models.tiling_centres(0)


def test_four_crops_start_as_the_four_quadrants_and_two_as_the_middle_band():
    images = _images(4, 64)
    model = cub_models.CubModel(backbone="squeezenet1_1", num_classes=5, num_st=4,
                                image_size=64, crop_size=32, rngs=nnx.Rngs(0))
    views = model.transformer_views(images)
    assert [v["name"] for v in views] == ["st1", "st2", "st3", "st4"]
    for v, (top, left) in zip(views, [(0, 0), (0, 32), (32, 0), (32, 32)]):
        # s = 0.5, t = +-0.5, align_corners=False: output pixel j samples input pixel j exactly.
        np.testing.assert_allclose(v["output"], images[:, top:top + 32, left:left + 32],
                                   atol=1e-3)
        np.testing.assert_allclose(v["theta"], [[0.5, (left - 16) / 32, (top - 16) / 32]] * 4)
        assert v["grid"].shape == (4, 32, 32, 2)
    model2 = cub_models.CubModel(backbone="squeezenet1_1", num_classes=5, num_st=2,
                                 image_size=64, crop_size=32, rngs=nnx.Rngs(1))
    views = model2.transformer_views(images)
    for v, left in zip(views, (0, 32)):
        np.testing.assert_allclose(v["output"], images[:, 16:48, left:left + 32], atol=1e-3)


def test_shapes_widths_and_parameter_counts():
    m0 = cub_models.CubModel(backbone="squeezenet1_1", num_classes=7, num_st=0, image_size=64,
                             crop_size=32, rngs=nnx.Rngs(0))
    m2 = cub_models.CubModel(backbone="squeezenet1_1", num_classes=7, num_st=2, image_size=64,
                             crop_size=32, rngs=nnx.Rngs(0))
    m2s = cub_models.CubModel(backbone="squeezenet1_1", num_classes=7, num_st=2, image_size=64,
                              crop_size=32, learn_scale=True, rngs=nnx.Rngs(0))
    squeeze = 722_496
    assert count_params(m0) == squeeze + 2 * 512 + 512 * 7 + 7  # feature BN, classifier
    # loc: backbone + 1x1 conv 512->128 + BN + FC (3*3*128)->128 + BN + FC 128->4; parts: 2
    # backbones; feature BN; classifier.
    loc = squeeze + 512 * 128 + 128 + 256 + 3 * 3 * 128 * 128 + 128 + 256 + 128 * 4 + 4
    assert count_params(m2) == loc + 2 * squeeze + 2 * 1024 + 1024 * 7 + 7
    assert count_params(m2s) == count_params(m2) + 128 * 2 + 2
    assert len(m2.backbones()) == 3 and m0.transformer_views(_images(4, 64)) == []
    for m in (m0, m2, m2s):
        m.eval()
        assert m(_images(4, 64)).shape == (4, 7)
    np.testing.assert_allclose(m2s.transformer_views(_images(4, 64))[1]["theta"],
                               [[0.5, 0.5, 0]] * 4)
    # The localisation learning rate reaches the loc backbone and regression, not the parts.
    labels = transformer_labels(m2)
    assert set(jax.tree.leaves(labels["transformer"])) == {"loc"}
    assert set(jax.tree.leaves(labels["parts"])) == {"base"}
    assert set(jax.tree.leaves(labels["classifier"])) == {"base"}


def _train_steps(model, images, labels, steps, lr):
    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels, key):
        def loss_fn(model):
            logits = model(images, rngs=nnx.Rngs(dropout=key))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    out = []
    for i in range(steps):
        out.append(step(model, optimizer, images, labels, jax.random.key(i)))
    return out


class _SmallBNInception(nnx.Module):
    """The stem and first two inception blocks of BN-Inception, pooled, with a classifier."""

    def __init__(self):
        self.net = backbones.host_init(
            lambda: backbones.BNInception(num_classes=3, num_blocks=2, rngs=nnx.Rngs(0)))
        self.dropout = nnx.Dropout(0.0)

    def __call__(self, x, *, rngs=None):
        return self.net(x)


def test_train_steps_with_batch_norm_update_statistics_and_learn():
    model = _SmallBNInception()
    images, labels = _images(4, 32), jnp.array([0, 1, 2, 0])
    bn = model.net.conv1_7x7_s2.bn
    mean0, var0 = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    model.train()
    conv = np.asarray(model.net.conv1_7x7_s2.conv(backbones.preprocess(images, "bn_inception")))
    losses = [float(l) for l, _ in _train_steps(model, images, labels, 1, 0.05)]
    # From mean 0, var 1 with flax momentum 0.9 (torch's 0.1): 0.1 * the batch's statistics
    # of the forward pass (before the update).
    assert np.all(mean0 == 0) and np.all(var0 == 1)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * conv.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * conv.var((0, 1, 2)),
                               rtol=1e-4)
    losses += [float(l) for l, _ in _train_steps(model, images, labels, 3, 0.05)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    model.eval()
    a, b = model(images), model(images)
    np.testing.assert_array_equal(a, b)  # eval: running statistics, no dropout
    model.train()
    assert not np.allclose(np.asarray(model(images)), np.asarray(a), atol=1e-3)


def test_st_train_step_moves_the_crops():
    model = cub_models.CubModel(backbone="squeezenet1_1", num_classes=3, num_st=2, image_size=64,
                                crop_size=32, rngs=nnx.Rngs(0))
    images, labels = _images(4, 64), jnp.array([0, 1, 2, 0])
    model.train()
    theta0 = np.asarray(model.transformer.theta(images))
    (loss, grads), = _train_steps(model, images, labels, 1, 1.0)
    assert np.isfinite(float(loss))
    assert np.abs(np.asarray(grads["transformer"]["regression"]["kernel"][...])).max() > 0
    theta1 = np.asarray(model.transformer.theta(images))
    assert np.abs(theta1 - theta0)[..., 1:].max() > 0
    np.testing.assert_array_equal(theta1[..., 0], 0.5)  # the scale stays fixed

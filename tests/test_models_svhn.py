"""Table-2 models (stn_jax.models.svhn): shapes, parameter counts, identity at initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stn_jax
from stn_jax.models import svhn


def _conv(cin, cout):
    return 25 * cin * cout + cout


def test_param_counts_by_hand():
    # The paper-width CNN at 64 px: eight 5x5 convs, 4x4x192 = 3072 features, FC 3072 x2,
    # five 11-way heads.
    convs = (_conv(3, 48) + _conv(48, 64) + _conv(64, 128) + _conv(128, 160) + _conv(160, 192)
             + 3 * _conv(192, 192))
    assert convs == 4_331_168
    cnn = convs + 2 * (3072 * 3072 + 3072) + 3072 * 55 + 55
    assert svhn.param_count("cnn", input_shape=(64, 64, 3)) == cnn == 23_380_695
    # 54x54 crops pool to 4x4 too (54 -> 27 -> 14 -> 7 -> 4): the same count.
    assert svhn.param_count("cnn", input_shape=(54, 54, 3)) == cnn
    # Single: conv 32 (3 -> 32), pool to 32x32, conv 32, FC 32x32x32 -> 32, FC 32, regression 6.
    single_loc = _conv(3, 32) + _conv(32, 32) + 32 * 32 * 32 * 32 + 32 + 32 * 32 + 32 + 32 * 6 + 6
    assert svhn.param_count("st_single", input_shape=(64, 64, 3)) == cnn + single_loc
    # Multi: FC 32 -> FC 32 -> 6 on 64x64x3, 32x32x48, 32x32x64 and 16x16x128.
    fc_loc = lambda n: n * 32 + 32 + 32 * 32 + 32 + 32 * 6 + 6  # noqa: E731
    multi = cnn + fc_loc(64 * 64 * 3) + fc_loc(32 * 32 * 48) + fc_loc(32 * 32 * 64) + fc_loc(
        16 * 16 * 128)
    assert svhn.param_count("st_multi", input_shape=(64, 64, 3)) == multi == 28_497_647
    # Batch norm adds a scale and a bias per channel of the 8 convs and the 2 FC layers.
    assert svhn.param_count("cnn", input_shape=(64, 64, 3), batch_norm=True) == cnn + 2 * (
        48 + 64 + 128 + 160 + 4 * 192 + 2 * 3072)


@pytest.mark.parametrize("name", svhn.MODEL_NAMES)
@pytest.mark.parametrize("shape,batch_norm", [((64, 64, 3), False), ((54, 54, 3), True)])
def test_built_models_match_closed_form(name, shape, batch_norm):
    model = svhn.create_model(name, input_shape=shape, width=0.25, batch_norm=batch_norm,
                              rngs=nnx.Rngs(0))
    assert svhn.count_params(model) == svhn.param_count(name, input_shape=shape, width=0.25,
                                                        batch_norm=batch_norm)
    assert len(model.transformers) == {"cnn": 0, "st_single": 1, "st_multi": 4}[name]
    assert all(isinstance(t, stn_jax.SpatialTransformer) for t in model.transformers)


def test_shapes_and_identity_at_init():
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    models = {name: svhn.create_model(name, input_shape=(64, 64, 3), width=0.125,
                                      rngs=nnx.Rngs(0)) for name in svhn.MODEL_NAMES}
    logits = {}
    for name, model in models.items():
        model.eval()
        logits[name] = model(x)
        assert logits[name].shape == (2, 5, 11)
    # Every regression layer starts at the identity: the ST models compute the CNN (built
    # from the same seed; their transformers are built after the classifier).
    np.testing.assert_array_equal(logits["st_single"], logits["cnn"])
    np.testing.assert_array_equal(logits["st_multi"], logits["cnn"])
    views = models["st_multi"].transformer_views(x)
    assert [v["name"] for v in views] == ["st1", "st2", "st3", "st4"]
    for view, side, channels in zip(views, (64, 32, 32, 16), (3, 6, 8, 16)):
        assert view["output"].shape == (2, side, side, channels)
        regular = jnp.broadcast_to(stn_jax.regular_grid((side, side)), (2, side, side, 2))
        np.testing.assert_allclose(view["grid"], regular, atol=1e-6)
    np.testing.assert_allclose(views[0]["output"], x, atol=1e-6)
    assert models["cnn"].transformer_views(x) == []


def test_multi_grids_compose_onto_the_input():
    model = svhn.create_model("st_multi", input_shape=(64, 64, 3), width=0.125,
                              rngs=nnx.Rngs(0))
    model.eval()
    # st1 zooms in by 2, st2 shifts by 0.2 (in st1's output coordinates): on the input,
    # st2 reads 0.5 * (p + (0.2, 0)) = 0.5 p + (0.1, 0).
    model.transformers[0].regression.bias[...] = jnp.array([0.5, 0, 0, 0, 0.5, 0])
    model.transformers[1].regression.bias[...] = jnp.array([1.0, 0, 0.2, 0, 1, 0])
    x = jax.random.uniform(jax.random.key(2), (1, 64, 64, 3))
    views = model.transformer_views(x)
    base = stn_jax.regular_grid((32, 32))  # st2 works on 32x32 maps
    np.testing.assert_allclose(views[1]["grid"][0], 0.5 * base + jnp.array([0.1, 0.0]),
                               atol=1e-6)
    np.testing.assert_allclose(views[2]["grid"][0], views[1]["grid"][0], atol=1e-6)
    # What st2 "sees" of the input: the input sampled where it reads.
    np.testing.assert_allclose(
        views[1]["input_view"], stn_jax.bilinear_sample(x, views[1]["grid"]), atol=1e-6)


def test_dropout_needs_rngs_in_training_only():
    model = svhn.create_model("cnn", input_shape=(64, 64, 3), width=0.125, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    a = model(x, rngs=nnx.Rngs(dropout=1))
    b = model(x, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="no `rngs`"):
        model(x)
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        svhn.create_model("st_cnn", input_shape=(64, 64, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_shape"):
        svhn.param_count("cnn", input_shape=(64, 64))
    model = svhn.create_model("cnn", input_shape=(64, 64, 3), width=0.125, rngs=nnx.Rngs(0))
    model.eval()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 64, 64, 3\)"):
        model(jnp.zeros((1, 54, 54, 3)))

"""The one training stack: tasks by name, per-process batches, batch statistics, dropout keys,
eval mode, and the localisation learning rate for every spatial transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import stn_jax
from stn_jax import tasks
from stn_jax.data import batching, pipeline
from stn_jax.models import mnist as mnist_models
from stn_jax.tasks import mnist as mnist_task
from stn_jax.train import state as state_lib
from stn_jax.train import steps


def test_get_task_by_name():
    config = ml_collections.ConfigDict({"task": "mnist"})
    assert "mnist" in tasks.task_names() and "base" not in tasks.task_names()
    assert isinstance(tasks.get_task(config), mnist_task.MnistTask)
    with pytest.raises(ValueError, match=r"config.task must be one of .*'mnist'.*got 'mnsit'"):
        tasks.get_task(ml_collections.ConfigDict({"task": "mnsit"}))


# ------------------------------------------------------------------------------ batching


def _mesh_sharding():
    return steps.batch_sharded(steps.make_mesh())


def test_local_rows_assemble_and_pad_on_one_process():
    sharding = _mesh_sharding()
    assert batching.local_rows(sharding, 8) == slice(0, 8)
    batch = batching.assemble({"x": np.arange(16.0).reshape(8, 2)}, sharding, 8)
    assert isinstance(batch["x"], jax.Array) and batch["x"].sharding == sharding
    np.testing.assert_array_equal(batch["x"], np.arange(16.0).reshape(8, 2))
    with pytest.raises(ValueError, match="7 rows, this process holds 8"):
        batching.assemble({"x": np.zeros((7, 2))}, sharding, 8)
    padded = batching.pad_batch({"image": np.ones((3, 2, 2)), "label": np.array([4, 5, 6])}, 5)
    np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(padded["label"], [4, 5, 6, 0, 0])
    assert padded["image"].shape == (5, 2, 2) and padded["image"][3:].sum() == 0


def test_prefetch_keeps_order_and_raises_at_the_failing_step():
    assert list(batching.prefetch(lambda s: s * 10, iter(range(6)), size=2)) == [
        0, 10, 20, 30, 40, 50]

    def make(step):
        if step == 3:
            raise OSError(f"bad file at step {step}")
        return step

    got = []
    with pytest.raises(OSError, match="step 3"):
        for item in batching.prefetch(make, iter(range(6))):
            got.append(item)
    assert got == [0, 1, 2]


@pytest.mark.parametrize("distortion, fixed", [("RTS", False), ("TC", False), ("R", True)])
def test_device_batches_equal_host_batches(distortion, fixed):
    config = dict(pipeline.default_data_config(distortion), source="bundled", num_train=200,
                  num_test=20, fixed_train=fixed)
    ds = pipeline.DistortedMNIST(config, seed=3)
    host = ds.train_batch(7, 16)
    device = ds.train_batch(7, 16, sharding=_mesh_sharding())
    assert device["image"].sharding == _mesh_sharding()
    np.testing.assert_array_equal(device["label"], host["label"])
    # The same draws and the same arithmetic, to the bit (runs reproduce the host path's).
    np.testing.assert_array_equal(device["image"], host["image"])
    assert float(jnp.abs(device["image"]).sum()) > 16 * 20  # Real digits, not blanks.
    # The test set as global padded batches: every digit once, padding masked.
    batches = list(ds.test_batches(8, sharding=_mesh_sharding()))
    assert len(batches) == 3
    mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
    np.testing.assert_array_equal(mask, [1] * 20 + [0] * 4)
    labels = np.concatenate([np.asarray(b["label"]) for b in batches])[:20]
    np.testing.assert_array_equal(labels, ds.test_set["label"])


# ------------------------------------------------------------------ model state and dropout


class _BnDropoutNet(nnx.Module):
    """Flatten -> Linear(4) -> BatchNorm -> Dropout(0.5) -> Linear(3)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(6, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5)
        self.fc2 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x, *, rngs=None):
        x = self.fc1(x.reshape(x.shape[0], -1))
        x = self.bn(x)
        return self.fc2(self.dropout(x, rngs=rngs))


class _FakeTask:
    name = "fake"

    def loss(self, logits, batch):
        return mnist_task.classification_loss(logits, batch)

    def eval_sums(self, logits, batch):
        return {**mnist_task.classification_sums(logits, batch), "logits": logits}


def _setup(seed=0):
    model = _BnDropoutNet(rngs=nnx.Rngs(seed))
    tx = optax.sgd(0.1)
    model.train()
    graphdef, params, model_state, constants = state_lib.split_model(model)
    model.eval()
    eval_graphdef = state_lib.split_model(model)[0]
    return graphdef, eval_graphdef, params, model_state, constants, tx


def test_train_step_updates_batch_stats_and_draws_dropout_per_step():
    graphdef, eval_graphdef, params, model_state, constants, tx = _setup()
    mesh = steps.make_mesh()
    step_fn = steps.make_train_step(_FakeTask(), graphdef, constants, tx, lambda s: 0.1, mesh,
                                    key=jax.random.key(5))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 2, 3, 1)).astype(np.float32),
             "label": rng.integers(0, 3, 8).astype(np.int32)}

    def fresh(step):
        state = state_lib.create_train_state(jax.tree.map(jnp.copy, params),
                                             jax.tree.map(jnp.copy, model_state), tx)
        return state.replace(step=jnp.asarray(step, jnp.int32))

    s0, m0 = step_fn(fresh(0), batch)
    s0b, m0b = step_fn(fresh(0), batch)
    s1, m1 = step_fn(fresh(1), batch)
    assert float(m0["loss"]) == float(m0b["loss"])  # Same step, same dropout mask.
    assert float(m0["loss"]) != float(m1["loss"])  # Another step, another mask.

    # Batch norm's running mean moved by momentum 0.5 towards the batch mean of fc1's output.
    h = batch["image"].reshape(8, -1) @ np.asarray(params["fc1"]["kernel"][...]) + np.asarray(
        params["fc1"]["bias"][...])
    want = 0.5 * np.asarray(model_state["bn"]["mean"][...]) + 0.5 * h.mean(0)
    np.testing.assert_allclose(np.asarray(s0.model_state["bn"]["mean"][...]), want, rtol=1e-5,
                               atol=1e-6)
    assert int(s0.step) == 1

    # Evaluation: no dropout, the running statistics (not the batch's).
    eval_fn = steps.make_eval_step(_FakeTask(), eval_graphdef, constants, mesh)
    eval_batch = batching.pad_batch(batch, 8)
    sums = eval_fn(s0.params, s0.model_state, eval_batch)
    p, ms = s0.params, s0.model_state
    h = batch["image"].reshape(8, -1) @ np.asarray(p["fc1"]["kernel"][...]) + np.asarray(
        p["fc1"]["bias"][...])
    bn = ms["bn"]
    normed = (h - np.asarray(bn["mean"][...])) / np.sqrt(np.asarray(bn["var"][...]) + 1e-5)
    normed = normed * np.asarray(p["bn"]["scale"][...]) + np.asarray(p["bn"]["bias"][...])
    logits = normed @ np.asarray(p["fc2"]["kernel"][...]) + np.asarray(p["fc2"]["bias"][...])
    np.testing.assert_allclose(np.asarray(sums["logits"]), logits, rtol=1e-4, atol=1e-5)
    assert float(sums["count"]) == 8


def test_loc_lr_multiplier_reaches_every_transformer_wherever_it_sits():
    def st(rngs):
        loc = nnx.Sequential(lambda x: x.reshape(x.shape[0], -1),
                             nnx.Linear(16, 4, rngs=rngs))
        return stn_jax.SpatialTransformer(loc, loc_features=4, kind="affine", out_shape=(4, 4),
                                          rngs=rngs)

    class Deep(nnx.Module):
        def __init__(self, rngs):
            self.first = st(rngs)
            self.blocks = nnx.List([nnx.Linear(2, 2, rngs=rngs), st(rngs)])
            self.parallel = nnx.List([st(rngs), st(rngs)])
            self.head = nnx.Linear(2, 2, rngs=rngs)

    model = Deep(nnx.Rngs(0))
    labels = state_lib.transformer_labels(model)
    flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(labels)[0]}
    loc = sorted(k for k, v in flat.items() if v == "loc")
    base = sorted(k for k, v in flat.items() if v == "base")
    # 4 transformers x (loc Linear + regression) x (kernel, bias).
    assert len(loc) == 16
    assert all(("first" in k or "parallel" in k or "'blocks'][1]" in k) for k in loc)
    assert len(base) == 4 and all(("head" in k or "'blocks'][0]" in k) for k in base)

    cfg = ml_collections.ConfigDict(dict(learning_rate=1.0, lr_decay_every=10,
                                         lr_decay_factor=0.1, momentum=0.0, weight_decay=0.0,
                                         loc_lr_multiplier=1e-4))
    tx = state_lib.make_optimizer(cfg, param_labels=labels)
    params = nnx.state(model, nnx.Param)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    for (path, u), label in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                                jax.tree.leaves(labels)):
        np.testing.assert_allclose(u, -(1e-4 if label == "loc" else 1.0), rtol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="param_labels"):
        state_lib.make_optimizer(cfg)


def test_lr_boundaries_schedule():
    cfg = ml_collections.ConfigDict(dict(learning_rate=0.1, lr_decay_factor=0.1,
                                         lr_decay_every=1, lr_boundaries=[10, 20, 25]))
    schedule = state_lib.learning_rate_schedule(cfg)
    for step, lr in [(0, 0.1), (9, 0.1), (10, 0.01), (19, 0.01), (20, 1e-3), (25, 1e-4)]:
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5)
    with pytest.raises(ValueError, match="lr_boundaries"):
        state_lib.learning_rate_schedule(ml_collections.ConfigDict(dict(
            learning_rate=0.1, lr_decay_factor=0.1, lr_decay_every=1, lr_boundaries=[20, 10])))


def test_mnist_model_views_one_transformer_or_none():
    x = jnp.zeros((2, 28, 28, 1))
    st_model = mnist_models.create_model("st_fcn", input_shape=(28, 28), rngs=nnx.Rngs(0))
    [view] = st_model.transformer_views(x)
    assert view["output"].shape == (2, 28, 28, 1) and view["grid"].shape == (2, 28, 28, 2)
    np.testing.assert_allclose(view["grid"][0], stn_jax.regular_grid((28, 28)), atol=1e-6)
    plain = mnist_models.create_model("fcn", input_shape=(28, 28), rngs=nnx.Rngs(0))
    assert plain.transformer_views(x) == []


def test_pictures_draw_every_transformer_in_its_colour():
    from stn_jax.train import pictures

    images = np.zeros((2, 28, 28, 1), np.float32)
    grid = np.asarray(stn_jax.regular_grid((14, 14)))
    views = [{"output": np.ones((2, 14, 14, 1)), "grid": np.broadcast_to(0.4 * grid - 0.5,
                                                                        (2, 14, 14, 2))},
             {"output": np.zeros((2, 14, 14, 1)), "grid": np.broadcast_to(0.4 * grid + 0.5,
                                                                         (2, 14, 14, 2))}]
    picture = pictures.render(images, labels=[1, 2], predictions=[1, 2], views=views, columns=1)
    one = pictures.render(images, labels=[1, 2], predictions=[1, 2], views=views[:1], columns=1)
    scale = pictures.display_scale(28)
    assert picture.shape[1] - one.shape[1] == 28 * scale + 6  # One more output panel.
    for colour, (lo, hi) in zip(pictures.OUTLINE_COLOURS[:2], [(0.05, 0.45), (0.55, 0.95)]):
        hit = np.all(picture == colour, axis=-1)
        rows, cols = np.nonzero(hit[: picture.shape[0] // 2, : one.shape[1] // 2])
        # Each outline sits where its grid reads: the upper-left or the lower-right part.
        width = 28 * scale + 2 * (28 * scale // 5)
        assert lo < (cols.mean() - 12) / width < hi, colour
    with pytest.raises(ValueError, match="not both"):
        pictures.render(images, labels=[1, 2], predictions=[1, 2], views=views,
                        outputs=images, grids=views[0]["grid"])


def test_progress_rate_leaves_out_compilation_and_pauses(monkeypatch):
    from stn_jax.train import loop

    clock = [100.0]
    monkeypatch.setattr(loop.time, "time", lambda: clock[0])
    progress = loop._Progress(0)
    clock[0] += 30.0  # Compiling and running the first step.
    assert progress.first_step_done(1) == 30.0
    assert progress.tick(1) is None  # No training time yet: no rate.
    clock[0] += 5.0
    assert progress.tick(26) == pytest.approx(5.0)  # 25 steps in 5 s.
    with progress.paused():  # An evaluation or a checkpoint.
        clock[0] += 100.0
    clock[0] += 5.0
    assert progress.tick(51) == pytest.approx(5.0)  # The 100 s are left out.
    clock[0] += 2.5
    assert progress.tick(76) == pytest.approx(0.7 * 5.0 + 0.3 * 10.0)  # Smoothed.

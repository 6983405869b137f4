"""Tests for stn_jax.train: schedule, optimiser, pictures, and short real training runs.

The runs use the bundled digits, a mild rotation and tiny schedules so the file stays fast on
two CPU cores; they still assert numbers that chance, a broken resume or a saved NaN cannot give.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from PIL import Image
import pytest

import stn_jax
from flax import nnx
from stn_jax.models import mnist
from stn_jax.data import pipeline
from stn_jax.train import (
    NonFiniteLossError,
    learning_rate_schedule,
    load_run,
    make_optimizer,
    train_and_evaluate,
    transformer_labels,
)
from stn_jax.train import metrics as metrics_lib
from stn_jax.train import pictures

import file_modules

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_config(**overrides) -> ml_collections.ConfigDict:
    """configs/mnist_r.py:runlocal=True on bundled digits, rotated by up to 30 degrees."""
    spec = importlib.util.spec_from_file_location("mnist_r", ROOT / "configs" / "mnist_r.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal=True")
    config.data.source = "bundled"
    config.data.rotation_deg = 30.0
    config.data.num_test = 500
    config.train.eval_batch_size = 250
    config.num_pictures = 4
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def tensorboard_values(workdir) -> dict[str, list[tuple[int, object]]]:
    """{tag: [(step, value)]} from the TFRecord event files under workdir/tb.

    Records are: uint64 length, uint32 crc, an Event proto, uint32 crc. Scalars come back as
    floats, images as their encoded PNG bytes.
    """
    from tensorboardX.proto import event_pb2

    values = {}
    for path in sorted((pathlib.Path(workdir) / "tb").glob("events.out.tfevents*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                value = v.simple_value if v.WhichOneof("value") == "simple_value" else (
                    v.image.encoded_image_string)
                values.setdefault(v.tag, []).append((event.step, value))
    return values


def saved(workdir, step: int) -> list[np.ndarray]:
    """The leaves of the TrainState saved at `step`, read back without a target."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "default"
    return jax.tree.leaves(ocp.StandardCheckpointer().restore(path))


# ------------------------------------------------------------------------- small pieces


def test_schedule_is_the_papers_step_decay():
    cfg = ml_collections.ConfigDict(
        dict(learning_rate=0.01, lr_decay_every=50_000, lr_decay_factor=0.1)
    )
    schedule = learning_rate_schedule(cfg)
    for step, lr in [(0, 0.01), (49_999, 0.01), (50_000, 0.001), (100_000, 1e-4),
                     (149_999, 1e-4)]:
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)


def test_optimizer_steps_by_hand():
    cfg = ml_collections.ConfigDict(dict(learning_rate=0.5, lr_decay_every=2, lr_decay_factor=0.1,
                                         momentum=0.9, weight_decay=0.01))
    tx = make_optimizer(cfg)
    params = {"w": jnp.array([1.0, -2.0])}
    grad = {"w": jnp.array([0.3, 0.4])}
    opt_state = tx.init(params)
    velocity = np.zeros(2)
    w = np.array([1.0, -2.0])
    for step, lr in enumerate([0.5, 0.5, 0.05]):
        velocity = 0.9 * velocity + (np.array([0.3, 0.4]) + 0.01 * w)  # L2 term uses w.
        updates, opt_state = tx.update(grad, opt_state, params)
        params = optax.apply_updates(params, updates)
        w = w - lr * velocity
        np.testing.assert_allclose(params["w"], w, rtol=1e-6, err_msg=f"step {step}")
    plain = make_optimizer(ml_collections.ConfigDict(
        dict(learning_rate=0.1, lr_decay_every=10, lr_decay_factor=0.1, momentum=0.0,
             weight_decay=0.0)))
    updates, _ = plain.update(grad, plain.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.03, -0.04], rtol=1e-6)


def test_loc_lr_multiplier_scales_only_the_transformer_updates():
    model = mnist.create_model("st_fcn", input_shape=(28, 28), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    base = dict(learning_rate=0.1, lr_decay_every=10, lr_decay_factor=0.1, momentum=0.9,
                weight_decay=0.0)
    plain = make_optimizer(ml_collections.ConfigDict(base))
    slow = make_optimizer(ml_collections.ConfigDict(dict(base, loc_lr_multiplier=0.1)),
                          param_labels=transformer_labels(model))
    want, _ = plain.update(grads, plain.init(params), params)
    got, _ = slow.update(grads, slow.init(params), params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(got)[0]]
    assert any("transformer" in p for p in paths) and any("head" in p for p in paths)
    for path, g, w in zip(paths, jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, (0.1 if "transformer" in path else 1.0) * w, rtol=1e-6,
                                   err_msg=path)
    with pytest.raises(ValueError, match="loc_lr_multiplier must be positive"):
        make_optimizer(ml_collections.ConfigDict(dict(base, loc_lr_multiplier=0.0)))


def test_grid_outline_of_identity_and_zoom():
    identity = np.asarray(stn_jax.regular_grid((4, 6)))
    outline = pictures.grid_outline(identity)
    assert outline.shape == (2 * (4 + 6 + 2), 2)
    np.testing.assert_allclose(outline.min(0), [-1, -1], atol=1e-6)
    np.testing.assert_allclose(outline.max(0), [1, 1], atol=1e-6)
    np.testing.assert_allclose(outline[0], [-1, -1], atol=1e-6)  # Starts top-left.
    half = pictures.grid_outline(0.5 * identity + 0.25)  # Zoom in on the lower right.
    np.testing.assert_allclose(half.min(0), [-0.25, -0.25], atol=1e-6)
    np.testing.assert_allclose(half.max(0), [0.75, 0.75], atol=1e-6)


def test_render_draws_grid_where_it_reads():
    images = np.zeros((3, 28, 28, 1), np.float32)
    grids = np.broadcast_to(np.asarray(stn_jax.regular_grid((14, 14))) * 0.5, (3, 14, 14, 2))
    picture = pictures.render(images, labels=np.array([1, 2, 3]), predictions=np.array([1, 2, 0]),
                              outputs=np.ones((3, 14, 14, 1)), grids=grids, columns=3)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    scale = pictures.display_scale(28)
    assert scale >= 4  # 28-pixel digits are upscaled to be readable.
    assert picture.shape[1] > 3 * 2 * 28 * scale
    red = (picture[..., 0] > 200) & (picture[..., 1] < 100)
    rows, cols = np.nonzero(red[:, : picture.shape[1] // 3])  # The first tile.
    # The outline of a half-size centred grid spans half the upscaled input (plus line width).
    assert abs((cols.max() - cols.min()) - 14 * scale) <= 3
    wild = np.full((3, 14, 14, 2), 1e30, np.float32)
    wild[0, 0, 0] = np.nan
    assert pictures.render(images, labels=[1, 2, 3], predictions=[1, 2, 3], outputs=images,
                           grids=wild).shape == picture.shape
    with pytest.raises(ValueError, match="grids"):
        pictures.render(images, labels=[1, 2, 3], predictions=[1, 2, 3], outputs=images)


def test_check_finite_names_the_step():
    history = [(7, {"loss": 0.5, "param_norm": 3.0}), (8, {"loss": np.nan, "param_norm": 3.0})]
    with pytest.raises(NonFiniteLossError, match=r"step 8 .*last good checkpoint \(step 6\)"):
        metrics_lib.check_finite(history, last_checkpoint=6)
    metrics_lib.check_finite(history[:1], last_checkpoint=None)
    assert metrics_lib.format_duration(3725) == "1h02m"
    assert metrics_lib.format_duration(65) == "1m05s"


# ------------------------------------------------------------------------ training runs


@pytest.mark.full_xla  # 120 steps: run time outweighs compile time (tests/conftest.py).
@pytest.mark.parametrize("model", ["cnn", "st_cnn"])
def test_short_training_learns(tmp_path, model):
    config = small_config(
        model__name=model, train__batch_size=32, train__num_steps=120, log_every=40,
        eval_every=120, checkpoint_every=120,
    )
    result = train_and_evaluate(config, str(tmp_path))
    # Chance is 90% error; 120 steps of 32 bundled digits (lr 0.01, momentum 0.9) reach about
    # 14% (CNN) and 16% (ST-CNN) here.
    assert result["test_error_pct"] < 30.0, result["test_error_pct"]
    assert result["steps"] == 120 and result["num_test"] == 500
    assert result["data_source"] == "bundled"
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test_error_pct"] == pytest.approx(result["test_error_pct"])
    assert on_disk["config"]["model"]["name"] == model


def test_one_step_writes_checkpoint_metrics_picture_and_logs_and_loads_back(tmp_path):
    config = small_config(model__name="st_fcn", train__batch_size=8, train__num_steps=1,
                          data__num_test=8, train__eval_batch_size=8)
    result = train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    leaves = saved(tmp_path, 1)
    assert sum(leaf.size for leaf in leaves if leaf.ndim) >= result["num_params"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test_error_pct", "test_accuracy", "steps", "wall_time_s", "num_params",
                "data_source", "config"):
        assert key in metrics, key
    assert metrics["steps"] == 1 and metrics["num_params"] > 10_000
    assert metrics["test_error_pct"] == pytest.approx(100 * (1 - metrics["test_accuracy"]))
    picture = Image.open(tmp_path / "pictures" / "step_000001.png")
    assert picture.mode == "RGB" and picture.width > 4 * 2 * 28 * 4  # 4 tiles, 2 panels, 4x.
    tb = tensorboard_values(tmp_path)
    # The training scalars of step 1, the test metrics and the picture of the evaluation.
    for tag in ("train/loss", "train/accuracy", "train/lr", "train/grad_norm"):
        assert [step for step, _ in tb[tag]] == [1], tag
    # The speed leaves out compilation, so a run of one (compiling) step reports none.
    assert "train/steps_per_s" not in tb
    [(step, error)] = tb["test/test_error_pct"]
    assert step == 1 and error == pytest.approx(metrics["test_error_pct"], rel=1e-6)
    [(step, png)] = tb["test/pictures"]
    assert step == 1 and Image.open(io.BytesIO(png)).size == picture.size

    # load_run rebuilds the run: the model holds the checkpoint's weights (the fresh model it
    # starts from is initialised from another key) and reproduces the run's test error.
    run = load_run(str(tmp_path))
    assert run.step == 1 and run.config.model.name == "st_fcn"
    for param in jax.tree.leaves(nnx.state(run.model, nnx.Param)):
        assert any(s.shape == param.shape and np.array_equal(s, param) for s in leaves)
    test = run.dataset.test_set
    predicted = np.argmax(run.model(jnp.asarray(test["image"][:8])), axis=-1)
    assert 100 * np.mean(predicted != test["label"][:8]) == pytest.approx(
        metrics["test_error_pct"])
    zoom = file_modules.load("scripts/transformer_zoom.py").run_zoom(str(tmp_path), images=16)
    assert zoom["step"] == 1 and 0.5 < zoom["min"] <= zoom["mean"] <= zoom["max"] < 1.5
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_run(str(bare))
    (bare / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="no checkpoint that can be restored"):
        load_run(str(bare))


def _kill_at(monkeypatch, step_to_kill: int, signum=signal.SIGTERM):
    original = pipeline.DistortedMNIST.train_batch

    def train_batch(self, step, batch_size, **kwargs):
        if step == step_to_kill:
            os.kill(os.getpid(), signum)  # The handler only sets a flag.
        return original(self, step, batch_size, **kwargs)

    monkeypatch.setattr(pipeline.DistortedMNIST, "train_batch", train_batch)


def test_stop_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    # Momentum and an lr decay at step 3 make the optimiser state and the schedule matter.
    def config(num_steps):
        return small_config(model__name="fcn", train__batch_size=16, train__num_steps=num_steps,
                            train__lr_decay_every=3, data__num_test=50, train__eval_batch_size=50,
                            log_every=2, eval_every=100, checkpoint_every=100, num_pictures=0)

    whole = train_and_evaluate(config(8), str(tmp_path / "whole"))
    # Stopped after 4 steps, then asked for 8 on the same workdir.
    train_and_evaluate(config(4), str(tmp_path / "extended"))
    extended = train_and_evaluate(config(8), str(tmp_path / "extended"))
    assert extended["resumed_from_step"] == 4
    # SIGTERM while the batch of step 2 is prepared (during step 1's update on the device):
    # step 2 is saved and the run returns. A first Ctrl-C (SIGINT) does the same.
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        _kill_at(patch, 2)
        preempted = train_and_evaluate(config(8), str(tmp_path / "preempted"))
    assert preempted == {"preempted": True, "steps": 2}
    assert os.listdir(tmp_path / "preempted" / "checkpoints") == ["2"]
    assert not (tmp_path / "preempted" / "metrics.json").exists()
    with monkeypatch.context() as patch:
        _kill_at(patch, 5, signal.SIGINT)
        interrupted = train_and_evaluate(config(8), str(tmp_path / "preempted"))
    assert interrupted == {"preempted": True, "steps": 5}
    # The run's handlers are gone again.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    resumed = train_and_evaluate(config(8), str(tmp_path / "preempted"))
    assert resumed["resumed_from_step"] == 5
    # Wall time over the three processes that worked on it, each segment recorded.
    assert [(s["first_step"], s["last_step"]) for s in resumed["segments"]] == [
        (0, 2), (2, 5), (5, 8)]
    assert resumed["wall_time_s"] == pytest.approx(
        sum(s["wall_time_s"] for s in resumed["segments"]))

    reference = saved(tmp_path / "whole", 8)
    for run in ("extended", "preempted"):
        leaves = saved(tmp_path / run, 8)
        assert len(leaves) == len(reference)
        for a, b in zip(leaves, reference):
            np.testing.assert_array_equal(a, b, err_msg=run)
    assert extended["test_loss"] == resumed["test_loss"] == whole["test_loss"]
    again = train_and_evaluate(config(8), str(tmp_path / "whole"))  # A finished run: evaluate.
    assert again["resumed_from_step"] == again["steps"] == 8
    assert again["test_loss"] == whole["test_loss"]


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    original = pipeline.DistortedMNIST.train_batch

    def train_batch(self, step, batch_size, **kwargs):
        batch = original(self, step, batch_size, **kwargs)
        if step == 4:  # The 5th update sees a NaN image.
            batch["image"] = batch["image"].at[0, 0, 0, 0].set(np.nan)
        return batch

    monkeypatch.setattr(pipeline.DistortedMNIST, "train_batch", train_batch)
    # log_every=100: only the check before each save stands between the NaN and checkpoint 6.
    config = small_config(model__name="fcn", train__batch_size=8, train__num_steps=10,
                          data__num_test=8, train__eval_batch_size=8, log_every=100,
                          eval_every=100, checkpoint_every=2, num_pictures=0)
    with pytest.raises(NonFiniteLossError, match=r"step 5 .*last good checkpoint \(step 4\)"):
        train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["2", "4"]
    assert all(np.isfinite(leaf).all() for leaf in saved(tmp_path, 4))
    assert not (tmp_path / "metrics.json").exists()


def test_huge_learning_rate_stops_before_any_checkpoint(tmp_path):
    config = small_config(model__name="fcn", train__batch_size=8, train__num_steps=10,
                          train__learning_rate=1e30, data__num_test=8,
                          train__eval_batch_size=8, checkpoint_every=1, num_pictures=0)
    with pytest.raises(NonFiniteLossError, match=r"at step [12] .*no checkpoint"):
        train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == []


@pytest.mark.parametrize("field, value, valid", [
    ("model__name", "stcnn", "'st_cnn'"),
    ("model__transform", "similarity", "'projective'"),
    ("data__source", "web", "'bundled'"),
])
def test_bad_names_fail_before_any_work(tmp_path, field, value, valid):
    with pytest.raises(ValueError, match=valid):
        train_and_evaluate(small_config(**{field: value}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_transformer_model_resumes_mid_run_and_old_checkpoints_go(tmp_path, monkeypatch):
    # An ST model (its localisation net at 0.1x the lr, momentum) stopped between periodic
    # checkpoints resumes exactly; only the newest 3 checkpoints are kept.
    def config():
        return small_config(model__name="st_fcn", train__batch_size=8, train__num_steps=7,
                            data__num_test=16, train__eval_batch_size=16, log_every=100,
                            eval_every=100, checkpoint_every=2, num_pictures=0)

    whole = train_and_evaluate(config(), str(tmp_path / "whole"))
    assert sorted(os.listdir(tmp_path / "whole" / "checkpoints"), key=int) == ["4", "6", "7"]
    with monkeypatch.context() as patch:
        _kill_at(patch, 5)
        assert train_and_evaluate(config(), str(tmp_path / "cut")) == {
            "preempted": True, "steps": 5}
    resumed = train_and_evaluate(config(), str(tmp_path / "cut"))
    assert resumed["resumed_from_step"] == 5
    for a, b in zip(saved(tmp_path / "cut", 7), saved(tmp_path / "whole", 7)):
        np.testing.assert_array_equal(a, b)
    assert resumed["test_loss"] == whole["test_loss"]


def test_ctrl_c_saves_and_exits_75_and_the_console_stays_quiet(tmp_path):
    import subprocess
    import sys
    import time

    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.train",
         "--config=configs/mnist_r.py:model=fcn,runlocal=True", f"--workdir={workdir}",
         "--config.data.source=bundled", "--config.data.num_test=16",
         "--config.train.eval_batch_size=16", "--config.train.num_steps=1000000",
         "--config.log_every=1000000", "--config.num_pictures=0"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = []
    deadline = time.time() + 600
    for line in proc.stderr:  # Wait until training runs, then press Ctrl-C once.
        lines.append(line)
        if "compiled and ran the first step" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == 75, log[-3000:]
    saved_steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(saved_steps) == 1 and saved_steps[0] >= 1
    assert "run the same command to resume" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    # No config dump (it is in config.json), no "no TPU here" line.
    assert "weight_decay" not in log and "Unable to initialize backend" not in log
    assert json.loads((workdir / "config.json").read_text())["train"]["weight_decay"] == 0.0

"""train_and_evaluate: the whole distorted-MNIST training run, as plain code to read and fork.

config -> data -> model -> (train step, log, evaluate + pictures, checkpoint)* -> metrics.json.

What lands in the workdir:
    checkpoints/<step>/   orbax checkpoints of the TrainState (the newest 3 are kept)
    tb/                   TensorBoard scalars (train/*, test/*) and the pictures
    pictures/step_XXXXXX.png   what the transformer does to test digits, at every evaluation
    metrics.json          the final test error and what produced it, written at the end

Restarting on the same workdir resumes from the newest checkpoint and continues exactly as if
the run had never stopped: the training batch and the step key are pure functions of the step.
SIGTERM (e.g. preemption) makes the loop finish its step, save a checkpoint and return.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np
import tensorboardX

from stn_jax import grids
from stn_jax.data import pipeline
from stn_jax.models import mnist
from stn_jax.train import checkpoint
from stn_jax.train import metrics as metrics_lib
from stn_jax.train import pictures
from stn_jax.train import state as state_lib
from stn_jax.train import steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the configured model on distorted MNIST, evaluating and checkpointing as it goes.

    Args:
        config: e.g. `configs/mnist_rts.py`'s `get_config()`: fields data, model, train, seed,
            log_every, eval_every, checkpoint_every, num_pictures.
        workdir: where checkpoints, logs, pictures and metrics.json go; a run restarted on the
            same workdir resumes from its newest checkpoint.

    Returns:
        The contents of metrics.json (test_error_pct, test_accuracy, steps, wall_time_s,
        num_params, data_source, config, ...). If SIGTERM stopped the run early, {"preempted":
        True, "steps": <saved step>} and no metrics.json.

    Raises:
        ValueError: a batch size that does not split over the devices, or an unknown model,
            before any work is done.
        metrics_lib.NonFiniteLossError: the loss became NaN/inf; names the step, and the newest
            checkpoint on disk is the last good one.

    Example:
        >>> config = get_config("runlocal=True")  # configs/mnist_rts.py
        >>> train_and_evaluate(config, "/tmp/run")["test_error_pct"]
    """
    start_time = time.time()
    _check_model_names(config.model)
    mesh = steps.make_mesh()
    steps.check_divisible(config.train.batch_size, mesh, name="train.batch_size")
    steps.check_divisible(config.train.eval_batch_size, mesh, name="train.eval_batch_size")
    dataset = pipeline.DistortedMNIST(config.data, seed=config.seed)  # Checks config.data.
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model = mnist.create_model(
        config.model.name,
        transform=config.model.transform,
        input_shape=dataset.image_shape,
        num_classes=dataset.num_classes,
        st_downsample=config.model.st_downsample,
        reference_width=config.model.reference_width,
        rngs=nnx.Rngs(init_key),
    )
    num_params = mnist.count_params(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model  # From here on the model is (graphdef, params, rest).

    tx = state_lib.make_optimizer(config.train)
    schedule = state_lib.learning_rate_schedule(config.train)
    state = jax.device_put(state_lib.create_train_state(params, tx), steps.replicated(mesh))
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint.make_manager(workdir)
    restored = checkpoint.restore_latest(manager, state)
    if restored is not None:
        state = restored
    first_step = int(state.step)
    logging.info(
        "%s/%s on %s data (%s, %d train digits, image %s), %d params, %d device(s); %s at step %d",
        config.model.name, config.model.transform, config.data.distortion, dataset.source,
        dataset.num_train, dataset.image_shape, num_params, mesh.devices.size,
        "resuming" if restored is not None else "starting", first_step,
    )

    train_step = steps.make_train_step(graphdef, rest, tx, schedule, mesh)
    eval_step = steps.make_eval_step(graphdef, rest, mesh)
    picture_fn = pictures.make_picture_fn(graphdef, rest)
    batch_sharding = steps.batch_sharded(mesh)
    writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
    num_steps = config.train.num_steps

    def evaluate_and_draw(step: int) -> dict:
        result = steps.evaluate(eval_step, state.params, dataset.test_set,
                                batch_size=config.train.eval_batch_size, mesh=mesh)
        logging.info("step %d: test error %.2f%% (loss %.4f, %d test digits)",
                     step, result["test_error_pct"], result["test_loss"], result["num_test"])
        for name in ("test_error_pct", "test_accuracy", "test_loss"):
            writer.add_scalar(f"test/{name}", result[name], step)
        if config.num_pictures > 0:
            picture = _draw(picture_fn, state.params, dataset.test_set, config.num_pictures,
                            title=f"step {step}: test error {result['test_error_pct']:.2f}%")
            pictures.save_png(picture, os.path.join(workdir, "pictures", f"step_{step:06d}.png"))
            writer.add_image("test/pictures", picture, step, dataformats="HWC")
        writer.flush()
        return result

    # Metrics stay on the device until a log, evaluation or checkpoint, so the host does not
    # wait for every step; they are checked for NaN before anything is saved.
    history = []
    window_start, window_first = time.time(), first_step
    last_saved = manager.latest_step()

    def flush(step: int) -> None:
        nonlocal history, window_start, window_first
        if not history:
            return
        host = jax.device_get(history)
        history = []
        metrics_lib.check_finite(host, last_checkpoint=last_saved)
        now = time.time()
        steps_per_s = (step - window_first) / max(now - window_start, 1e-9)
        window_start, window_first = now, step
        mean = metrics_lib.mean_metrics(host)
        logging.info(
            "step %d/%d: loss %.4f, train accuracy %.3f, lr %.3g, %.2f steps/s, ETA %s",
            step, num_steps, mean["loss"], mean["accuracy"], mean["lr"], steps_per_s,
            metrics_lib.format_duration((num_steps - step) / steps_per_s),
        )
        for name, value in mean.items():
            writer.add_scalar(f"train/{name}", value, step)
        writer.add_scalar("train/steps_per_s", steps_per_s, step)

    result = None
    step = first_step
    try:
        with _stop_on_sigterm() as stop:
            while step < num_steps and not stop.is_set():
                batch = dataset.train_batch(step, config.train.batch_size)
                batch = jax.device_put(batch, batch_sharding)
                state, step_metrics = train_step(state, batch, jax.random.fold_in(train_key, step))
                step += 1
                history.append((step, step_metrics))
                done = step == num_steps
                log_now = step % config.log_every == 0 or done
                eval_now = step % config.eval_every == 0 or done
                save_now = step % config.checkpoint_every == 0 or done
                if log_now or eval_now or save_now:
                    flush(step)  # Raises on a non-finite loss, so a bad state is never saved.
                if eval_now:
                    result = evaluate_and_draw(step)
                if save_now:
                    last_saved = checkpoint.save(manager, state)
        flush(step)
        if step < num_steps:  # Stopped by SIGTERM.
            last_saved = checkpoint.save(manager, state)
            logging.info("SIGTERM: saved step %d in %s; run the same command to resume.",
                         last_saved, manager.directory)
            return {"preempted": True, "steps": last_saved}
        if result is None:  # Resumed from a finished run: nothing trained, evaluate again.
            result = evaluate_and_draw(step)
    finally:
        writer.close()
        checkpoint.close(manager)

    final = {
        **result,
        "steps": step,
        "resumed_from_step": first_step,
        "wall_time_s": time.time() - start_time,
        "num_params": num_params,
        "data_source": dataset.source,
        "num_devices": int(mesh.devices.size),
        "config": config.to_dict(),
    }
    metrics_lib.write_json(os.path.join(workdir, "metrics.json"), final)
    logging.info("done: %d steps, test error %.2f%%, %.1f s; metrics in %s", step,
                 final["test_error_pct"], final["wall_time_s"],
                 os.path.join(workdir, "metrics.json"))
    return final


def _check_model_names(model_config: ml_collections.ConfigDict) -> None:
    """Fails on an unknown model or transform name before the data is loaded."""
    if model_config.name not in mnist.MODEL_NAMES:
        raise ValueError(f"model.name must be one of {mnist.MODEL_NAMES}, "
                         f"got {model_config.name!r}")
    if model_config.transform not in grids.KINDS:
        raise ValueError(f"model.transform must be one of {grids.KINDS}, "
                         f"got {model_config.transform!r}")


def _draw(picture_fn, params, test_set: dict, count: int, *, title: str) -> np.ndarray:
    """The picture of the model on `count` test digits spread evenly over the test set."""
    n = len(test_set["label"])
    index = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    images, labels = test_set["image"][index], test_set["label"][index]
    out = jax.device_get(picture_fn(params, images))
    return pictures.render(
        images, labels=labels, predictions=np.argmax(out["logits"], -1),
        outputs=out.get("output"), grids=out.get("grid"), title=title,
    )


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """An event that SIGTERM sets while inside the block (only the main thread gets signals)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)

"""train_and_evaluate: one training run of any task, as plain code to read and fork.

config -> task -> data + model -> (train step, log, evaluate + pictures, checkpoint)* ->
metrics.json. The loop never names an experiment family: `config.task` picks a module of
`stn_jax.tasks`, which owns the data, the model, the loss, the metrics and the pictures.

What lands in the workdir:
    checkpoints/<step>/   orbax checkpoints of the TrainState (the newest 3 are kept)
    tb/                   TensorBoard scalars (train/*, test/*) and the pictures
    pictures/step_XXXXXX.png   what the model's transformers do to test examples
    metrics.json          the final test metrics and what produced them, written at the end
    config.json           the run's config, written at the start
    segments.json         start, end and steps of every process that worked on this run

Restarting on the same workdir resumes from the newest checkpoint and continues exactly as if
the run had never stopped: the training batch and the step key are pure functions of the step.
SIGTERM or Ctrl-C (SIGINT) makes the loop finish its step, save a checkpoint and return with
{"preempted": True}; a second Ctrl-C aborts at once.

Many processes (a TPU pod, a GPU cluster): run the same command in every process after
`jax.distributed.initialize()`. The mesh spans every device; each process builds only its
rows of each batch; every process takes part in the checkpoints; process 0 alone writes
TensorBoard, pictures and the JSON files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from typing import Iterator, NamedTuple

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np
import tensorboardX

from stn_jax import tasks
from stn_jax.models import count_params
from stn_jax.train import checkpoint
from stn_jax.train import metrics as metrics_lib
from stn_jax.train import pictures
from stn_jax.train import state as state_lib
from stn_jax.train import steps

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped early on purpose; rerun to resume.
_STOP_SYNC_EVERY = 10  # Steps between the processes' agreement on a stop signal.


def check_config(config: ml_collections.ConfigDict, *,
                 num_devices: int | None = None) -> tasks.Task:
    """The task of `config`, after checking every field the loop and the task read.

    Cheap (no data, no model): the entry point calls it before any work.

    Args:
        config: the run config.
        num_devices: if given, the batch sizes must split evenly over this many devices.

    Raises:
        ValueError: naming the first bad field.
    """
    task = tasks.get_task(config)
    train = config.train
    positive = {
        "train.num_steps": train.num_steps, "train.batch_size": train.batch_size,
        "train.eval_batch_size": train.eval_batch_size, "log_every": config.log_every,
        "eval_every": config.eval_every, "checkpoint_every": config.checkpoint_every,
    }
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if config.num_pictures < 0:
        raise ValueError(f"num_pictures must be >= 0, got {config.num_pictures}")
    if not train.learning_rate > 0:
        raise ValueError(f"train.learning_rate must be positive, got {train.learning_rate}")
    state_lib.learning_rate_schedule(train)  # Checks the schedule's fields.
    task.check_config()
    if num_devices is not None:
        for name in ("batch_size", "eval_batch_size"):
            steps.check_divisible(train[name], num_devices, name=f"train.{name}")
    return task


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the configured task's model, evaluating and checkpointing as it goes.

    Args:
        config: e.g. `configs/mnist_rts.py`'s `get_config()`: fields task, seed, data, model,
            train, log_every, eval_every, checkpoint_every, num_pictures.
        workdir: where checkpoints, logs, pictures and metrics.json go; a run restarted on the
            same workdir resumes from its newest checkpoint.

    Returns:
        The contents of metrics.json (test_error_pct, test_loss, steps, wall_time_s,
        num_params, data_source, config, ...). If a signal stopped the run early,
        {"preempted": True, "steps": <saved step>} and no metrics.json.

    Raises:
        ValueError: a bad config field or a batch size that does not split over the devices,
            before any work is done.
        metrics_lib.NonFiniteLossError: the loss became NaN/inf; names the step, and the newest
            checkpoint on disk is the last good one.

    Example:
        >>> config = get_config("runlocal=True")  # configs/mnist_rts.py
        >>> train_and_evaluate(config, "/tmp/run")["test_error_pct"]
    """
    start_time = time.time()
    mesh = steps.make_mesh()
    task = check_config(config, num_devices=mesh.devices.size)
    is_main = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        metrics_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())

    dataset = task.make_dataset()
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model, tx, state = _model_and_state(config, task, dataset, mesh, key=init_key)
    num_params = count_params(model)
    schedule = state_lib.learning_rate_schedule(config.train)
    model.train()
    graphdef, _, _, constants = state_lib.split_model(model)
    model.eval()
    eval_graphdef = state_lib.split_model(model)[0]
    description = task.describe(dataset, model)
    del model  # From here on the model is the state's arrays and the two graphdefs.

    manager = checkpoint.make_manager(workdir)
    restored = checkpoint.restore_latest(manager, state)
    if restored is not None:
        state = restored
    first_step = int(steps.to_host(state.step))
    logging.info("%s; %d device(s) in %d process(es); %s at step %d",
                 description,
                 mesh.devices.size, jax.process_count(),
                 "resuming" if restored is not None else "starting", first_step)

    train_step = steps.make_train_step(task, graphdef, constants, tx, schedule, mesh,
                                       key=train_key)
    eval_step = steps.make_eval_step(task, eval_graphdef, constants, mesh)
    batch_sharding = steps.batch_sharded(mesh)
    writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tb")) if is_main else None
    num_steps = config.train.num_steps
    examples = dataset.picture_examples(config.num_pictures) if config.num_pictures else None
    progress = _Progress(first_step)

    def evaluate_and_draw(step: int) -> dict:
        with progress.paused():
            batches = dataset.test_batches(config.train.eval_batch_size, sharding=batch_sharding)
            result = task.summarize(steps.evaluate(eval_step, state, batches))
            logging.info("step %d: test error %.2f%% (loss %.4f, %d test examples)", step,
                         result["test_error_pct"], result["test_loss"], result["num_test"])
            if is_main:
                for name, value in result.items():
                    if isinstance(value, (int, float)) and name != "num_test":
                        writer.add_scalar(f"test/{name}", value, step)
                if examples is not None:
                    host = steps.to_host((state.params, state.model_state))
                    picture = task.picture(
                        nnx.merge(eval_graphdef, *host, constants), examples,
                        title=f"step {step}: test error {result['test_error_pct']:.2f}%")
                    if picture is not None:
                        pictures.save_png(picture, os.path.join(workdir, "pictures",
                                                                f"step_{step:06d}.png"))
                        writer.add_image("test/pictures", picture, step, dataformats="HWC")
                writer.flush()
        return result

    def save() -> int:
        with progress.paused():
            return checkpoint.save(manager, state)

    # Metrics stay on the device until a log, evaluation or checkpoint, so the host does not
    # wait for every step; they are checked for NaN before anything is saved.
    history = []
    last_saved = manager.latest_step()

    def flush(step: int) -> None:
        nonlocal history
        if not history:
            return
        host = steps.to_host(history)  # Waits for the devices: the steps are done.
        history = []
        metrics_lib.check_finite(host, last_checkpoint=last_saved)
        mean = metrics_lib.mean_metrics(host)
        rate = progress.tick(step)
        logging.info(
            "step %d/%d: loss %.4f, train accuracy %.3f, lr %.3g, %s steps/s, ETA %s",
            step, num_steps, mean["loss"], mean.get("accuracy", math.nan), mean["lr"],
            "?" if rate is None else f"{rate:.2f}",
            metrics_lib.format_duration((num_steps - step) / rate if rate else math.inf),
        )
        if is_main:
            for name, value in mean.items():
                writer.add_scalar(f"train/{name}", value, step)
            if rate:
                writer.add_scalar("train/steps_per_s", rate, step)

    result = None
    step = first_step
    try:
        with _stop_on_signals() as stop:
            batch = (dataset.train_batch(step, config.train.batch_size, sharding=batch_sharding)
                     if step < num_steps else None)
            while step < num_steps:
                if step == first_step:
                    logging.info("compiling the train step (the first step waits for it)...")
                state, step_metrics = train_step(state, batch)
                step += 1
                # Built while the step runs on the devices.
                batch = (dataset.train_batch(step, config.train.batch_size,
                                             sharding=batch_sharding)
                         if step < num_steps else None)
                history.append((step, step_metrics))
                if step == first_step + 1:
                    jax.block_until_ready(step_metrics)
                    logging.info("compiled and ran the first step in %.1f s",
                                 progress.first_step_done(step))
                    flush(step)
                done = step == num_steps
                log_now = step % config.log_every == 0 or done
                eval_now = step % config.eval_every == 0 or done
                save_now = step % config.checkpoint_every == 0 or done
                if log_now or eval_now or save_now:
                    flush(step)  # Raises on a non-finite loss, so a bad state is never saved.
                if eval_now:
                    result = evaluate_and_draw(step)
                if save_now:
                    last_saved = save()
                if _should_stop(stop, step):
                    break
        flush(step)
        if step < num_steps:  # Stopped by a signal.
            last_saved = save()
            logging.info("stopped by a signal: saved step %d in %s; run the same command to "
                         "resume.", last_saved, manager.directory)
            _record_segment(workdir, start_time, first_step, step, is_main)
            return {"preempted": True, "steps": last_saved}
        if result is None:  # Resumed from a finished run: nothing trained, evaluate again.
            result = evaluate_and_draw(step)
    finally:
        if writer is not None:
            writer.close()
        checkpoint.close(manager)

    segments = _record_segment(workdir, start_time, first_step, step, is_main)
    final = {
        **result,
        "task": task.name,
        "steps": step,
        "resumed_from_step": first_step,
        "wall_time_s": sum(s["wall_time_s"] for s in segments),
        "segments": segments,
        "num_params": num_params,
        "data_source": dataset.source,
        "num_devices": int(mesh.devices.size),
        "num_processes": jax.process_count(),
        "config": config.to_dict(),
    }
    if is_main:
        metrics_lib.write_json(os.path.join(workdir, "metrics.json"), final)
    logging.info("done: %d steps, test error %.2f%%, %.1f s; metrics in %s", step,
                 final["test_error_pct"], final["wall_time_s"],
                 os.path.join(workdir, "metrics.json"))
    return final


def _model_and_state(config: ml_collections.ConfigDict, task: tasks.Task,
                     dataset: tasks.Dataset, mesh: jax.sharding.Mesh, *, key: jax.Array):
    """(model, optimiser, train state): the task's model initialised from `key`, its optimiser
    (the transformer's parameters labelled for their own rate) and the fresh TrainState of
    both, replicated over `mesh`; what a run starts from and what a checkpoint restores into."""
    model = task.create_model(dataset, rngs=nnx.Rngs(key))
    tx = state_lib.make_optimizer(config.train,
                                  param_labels=state_lib.transformer_labels(model))
    _, params, model_state, _ = state_lib.split_model(model)
    state = steps.replicate(state_lib.create_train_state(params, model_state, tx), mesh)
    return model, tx, state


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run wrote to `workdir/config.json`.

    Raises:
        ValueError: `workdir` has no config.json (it is not a run folder).
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"workdir={workdir!r} has no config.json: not a run folder")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


class Run(NamedTuple):
    """A run folder rebuilt by `load_run`."""
    config: ml_collections.ConfigDict  # The run's config (from config.json).
    task: tasks.Task  # The experiment family's task object for that config.
    dataset: tasks.Dataset  # The task's data set, built as the run built it.
    model: nnx.Module  # In eval mode, with the weights of the newest good checkpoint.
    step: int  # The step of that checkpoint.


def load_run(workdir: str) -> Run:
    """Rebuilds a run of `train_and_evaluate` from its folder, at its newest checkpoint.

    The task, data set and model are built from `workdir/config.json` as the run built them,
    and the newest checkpoint that restores and verifies (see `checkpoint.restore_latest`)
    replaces the model's weights and state. Works on finished and on stopped runs.

    Args:
        workdir: a run folder (`--workdir` of `experiments.train`, or one trial of a sweep).

    Returns:
        Run(config, task, dataset, model, step); the model is in eval mode, on the host's
        default device, ready to call on images shaped like the data set's.

    Raises:
        ValueError: `workdir` has no config.json, or no checkpoint that can be restored.

    Example:
        >>> run = load_run("/tmp/run")  # python -m experiments.train ... --workdir=/tmp/run
        >>> batch = run.dataset.train_batch(0, 16)
        >>> logits = run.model(batch["image"])  # (16, 10) for MNIST
    """
    config = read_config(workdir)
    mesh = steps.make_mesh()
    task = tasks.get_task(config)
    dataset = task.make_dataset()
    # The key only shapes the target: every array is replaced by the checkpoint's.
    model, _, like = _model_and_state(config, task, dataset, mesh, key=jax.random.key(0))
    model.eval()
    graphdef, _, _, constants = state_lib.split_model(model)
    manager = checkpoint.make_manager(workdir)
    try:
        state = checkpoint.restore_latest(manager, like)
    finally:
        checkpoint.close(manager)
    if state is None:
        raise ValueError(f"workdir={workdir!r} has no checkpoint that can be restored")
    host = steps.to_host((state.params, state.model_state))
    model = nnx.merge(graphdef, *host, constants)
    return Run(config, task, dataset, model, int(steps.to_host(state.step)))


class _Progress:
    """Steps per second over training time only: compilation, evaluations and checkpoints are
    left out, and the rate is smoothed (exponential moving average over log windows).

    `tick` is called only where the host has waited for the devices (a log line), since with
    asynchronous dispatch the host may be many steps ahead of them in between."""

    def __init__(self, first_step: int):
        self._start = time.time()
        self._excluded = 0.0
        self._mark_time, self._mark_step = None, first_step
        self._rate = None

    def first_step_done(self, step: int) -> float:
        """Starts the clock after the (compiling) first step; returns how long it took."""
        elapsed = time.time() - self._start
        self._mark_time, self._mark_step = time.time(), step
        self._excluded = 0.0
        return elapsed

    @contextlib.contextmanager
    def paused(self):
        begin = time.time()
        try:
            yield
        finally:
            self._excluded += time.time() - begin

    def tick(self, step: int) -> float | None:
        """Folds the steps done since the last tick into the rate; returns the rate."""
        if self._mark_time is None or step <= self._mark_step:
            return self._rate
        spent = time.time() - self._mark_time - self._excluded
        if spent > 0:
            rate = (step - self._mark_step) / spent
            self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
            self._mark_time, self._mark_step, self._excluded = time.time(), step, 0.0
        return self._rate


def _should_stop(stop: threading.Event, step: int) -> bool:
    """Whether to stop now; with many processes all agree (any signal stops all), checked
    every few steps so that no process leaves the others waiting in a collective."""
    if jax.process_count() == 1:
        return stop.is_set()
    if step % _STOP_SYNC_EVERY:
        return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([stop.is_set()], np.int32))
    return bool(np.any(flags))


def _record_segment(workdir: str, start: float, first_step: int, last_step: int,
                    is_main: bool) -> list[dict]:
    """Appends this process's segment (times, steps) to segments.json; returns them all."""
    path = os.path.join(workdir, "segments.json")
    segments = []
    if os.path.exists(path):
        with open(path) as f:
            segments = json.load(f)
    end = time.time()
    segments.append({"start": start, "end": end, "wall_time_s": end - start,
                     "first_step": first_step, "last_step": last_step})
    if is_main:
        metrics_lib.write_json(path, segments)
    return segments


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGTERM or a first SIGINT sets inside the block; a second SIGINT raises
    KeyboardInterrupt (abort without saving). Only the main thread gets signals."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_term(signum, frame):
        logging.warning("SIGTERM: finishing this step, then saving a checkpoint.")
        stop.set()

    def on_int(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        logging.warning("Ctrl-C: finishing this step, then saving a checkpoint "
                        "(Ctrl-C again to abort without saving).")
        stop.set()

    previous = {s: signal.signal(s, h) for s, h in
                ((signal.SIGTERM, on_term), (signal.SIGINT, on_int))}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

"""Pure, jitted train and eval steps, data-parallel over the local devices.

The model is split once (`graphdef, params, rest = nnx.split(model, nnx.Param, ...)`); the steps
close over `graphdef` and `rest` and merge inside, so what crosses the jit boundary is plain
arrays. The batch is split over a 1-D mesh of the devices (axis "data"); the state is
replicated; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stn_jax.train.state import TrainState

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over `devices` (default: all local devices) with axis "data"."""
    devices = jax.local_devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def check_divisible(batch_size: int, mesh: jax.sharding.Mesh, *, name: str) -> None:
    """Raises ValueError unless `batch_size` splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        raise ValueError(
            f"{name}={batch_size} must be a positive multiple of the number of devices ({n}): "
            f"each device gets an equal share of the batch"
        )


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The sharding that puts a full copy on every device (params, optimiser state)."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The sharding that splits the leading (batch) axis over the devices."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def _logits(graphdef: nnx.GraphDef, params: Any, rest: Any, image: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params, rest)(image)


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Returns the jitted step `(state, batch, key) -> (state, metrics)`; `state` is donated.

    Args:
        graphdef, rest: from `nnx.split(model, nnx.Param, ...)`; `rest` (non-Param state, empty
            for the MNIST models) is held constant.
        tx: the optimiser, e.g. `make_optimizer(config.train)`.
        schedule: its learning-rate schedule, only to report the lr of the step.
        mesh: the devices; batch leaves are split over axis "data", the state is replicated.

    The step takes `batch = {"image": (B,H,W,C) float, "label": (B,) int}` and a key
    (`fold_in(key, step)`), which the deterministic MNIST models do not use: it is there so a
    model with dropout fits the same loop. Metrics (scalars, computed before the update but
    `param_norm` after it): loss, accuracy, lr, grad_norm, param_norm.

    Example:
        >>> step_fn = make_train_step(graphdef, rest, tx, schedule, make_mesh())
        >>> state, metrics = step_fn(state, batch, jax.random.fold_in(key, 0))
    """

    def loss_fn(params, batch):
        logits = _logits(graphdef, params, rest, batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, logits

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        del key  # The MNIST models have no dropout or other randomness.
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
                # Checked with the loss, so that a finite loss whose update overflowed the
                # parameters is caught before those parameters are ever saved.
            "param_norm": optax.tree.norm(params),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    rep, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        train_step,
        in_shardings=(rep, data, rep),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )


def make_eval_step(
    graphdef: nnx.GraphDef, rest: Any, mesh: jax.sharding.Mesh
) -> Callable[[Any, dict], dict]:
    """Returns the jitted `(params, batch) -> sums` over one padded test batch.

    `batch` has "image", "label" and "mask" (1 for real examples, 0 for padding); the result
    holds the sums "correct", "loss" and "count" over the real examples, so batches add up.
    """

    def eval_step(params, batch):
        logits = _logits(graphdef, params, rest, batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        mask = batch["mask"]
        return {
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }

    rep, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(eval_step, in_shardings=(rep, data), out_shardings=rep)


def evaluate(
    eval_step: Callable[[Any, dict], dict],
    params: Any,
    test_set: dict,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
) -> dict:
    """Test error (%), accuracy and mean loss of `params` over the whole `test_set`.

    Args:
        eval_step: from `make_eval_step`.
        params: the model's params (replicated).
        test_set: {"image": (N,H,W,C), "label": (N,)} numpy arrays.
        batch_size: examples per eval step (a multiple of the device count); the last batch is
            padded with masked examples so there is only one compiled shape.
        mesh: the devices.

    Returns:
        {"test_error_pct", "test_accuracy", "test_loss", "num_test"} as Python floats/ints.
    """
    images, labels = test_set["image"], test_set["label"]
    n = len(labels)
    if n == 0:
        raise ValueError("test_set is empty")
    sharding = batch_sharded(mesh)
    totals = None
    for start in range(0, n, batch_size):
        image, label = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(label)
        batch = {
            "image": np.pad(image, [(0, pad)] + [(0, 0)] * (image.ndim - 1)),
            "label": np.pad(label, (0, pad)),
            "mask": np.pad(np.ones(len(label), np.float32), (0, pad)),
        }
        sums = eval_step(params, jax.device_put(batch, sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    accuracy = float(totals["correct"]) / n
    return {
        "test_error_pct": 100.0 * (1.0 - accuracy),
        "test_accuracy": accuracy,
        "test_loss": float(totals["loss"]) / n,
        "num_test": n,
    }

"""Pure, jitted train and eval steps, data-parallel over every device of every process.

The model is split once (`state.split_model`): `graphdef` and `constants` are closed over and
merged inside the steps, so what crosses the jit boundary is plain arrays. The batch is split
over a 1-D mesh of all devices (axis "data"); the state is replicated; XLA inserts the gradient
all-reduce. On a pod the same code runs in every process: the mesh spans `jax.devices()` of
all hosts, each process feeds its own rows of the batch (`stn_jax.data.batching`).
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
    """A 1-D mesh over `devices` (default: all devices of all processes) with axis "data"."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def check_divisible(batch_size: int, devices: jax.sharding.Mesh | int, *, name: str) -> None:
    """Raises ValueError unless `batch_size` splits evenly over the devices (a mesh or a
    count)."""
    n = devices if isinstance(devices, int) else devices.devices.size
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


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """`tree` (the same values in every process) as global arrays replicated over `mesh`."""
    sharding = replicated(mesh)

    def one(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def to_host(tree: Any) -> Any:
    """Numpy copies of replicated (or this process's fully addressable) arrays."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def make_train_step(
    task,
    graphdef: nnx.GraphDef,
    constants: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    key: jax.Array,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns the jitted step `(state, batch) -> (state, metrics)`; `state` is donated.

    Args:
        task: the run's `stn_jax.tasks.Task` (its `loss`).
        graphdef, constants: from `split_model(model)` with the model in train mode.
        tx: the optimiser, e.g. `make_optimizer(config.train, ...)`.
        schedule: its learning-rate schedule, only to report the lr of the step.
        mesh: the devices; batch leaves are split over axis "data", the state is replicated.
        key: the run's step key; step s draws from `fold_in(key, s)` (dropout), so a resumed
            run draws what an uninterrupted one would.

    The model's batch statistics (`state.model_state`) come out of the forward pass updated.
    Metrics (scalars, computed before the update but `param_norm` after it): the task's (loss,
    accuracy, ...), lr, grad_norm, param_norm.

    Example:
        >>> step_fn = make_train_step(task, graphdef, constants, tx, schedule, make_mesh(),
        ...                           key=jax.random.key(0))
        >>> state, metrics = step_fn(state, batch)
    """

    def loss_fn(params, model_state, batch, step_key):
        # copy=True: fresh Variables at this trace level, so batch norm may update its
        # statistics inside the gradient's trace.
        model = nnx.merge(graphdef, params, model_state, constants, copy=True)
        outputs = model(batch["image"], rngs=nnx.Rngs(dropout=step_key))
        loss, metrics = task.loss(outputs, batch)
        return loss, (metrics, nnx.state(model, nnx.BatchStat))

    def train_step(state: TrainState, batch: dict):
        step_key = jax.random.fold_in(key, state.step)
        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, batch, step_key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "loss": loss,
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
            # Checked with the loss, so that a finite loss whose update overflowed the
            # parameters is caught before those parameters are ever saved.
            "param_norm": optax.tree.norm(params),
        }
        new_state = TrainState(step=state.step + 1, params=params, model_state=model_state,
                               opt_state=opt_state)
        return new_state, metrics

    rep, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(train_step, in_shardings=(rep, data), out_shardings=(rep, rep),
                   donate_argnums=0)


def make_eval_step(
    task, graphdef: nnx.GraphDef, constants: Any, mesh: jax.sharding.Mesh
) -> Callable[[Any, Any, dict], dict]:
    """Returns the jitted `(params, model_state, batch) -> sums` over one padded test batch.

    `graphdef` is the model's in eval mode (no dropout, running batch statistics). `batch` has
    a "mask" leaf (1 for real examples, 0 for padding); the result holds the task's sums over
    the real examples (`task.eval_sums`), so batches add up.
    """

    def eval_step(params, model_state, batch):
        model = nnx.merge(graphdef, params, model_state, constants)
        return task.eval_sums(model(batch["image"]), batch)

    rep, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(eval_step, in_shardings=(rep, rep, data), out_shardings=rep)


def evaluate(eval_step, state: TrainState, batches) -> dict:
    """The task's summed eval metrics of `state` over `batches` (global padded batches).

    Returns:
        {name: numpy array} summed over every batch, identical in every process.
    """
    totals = None
    for batch in batches:
        sums = eval_step(state.params, state.model_state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("the test set is empty")
    return to_host(totals)

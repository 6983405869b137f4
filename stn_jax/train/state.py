"""The train state and the optimiser of the paper: SGD with a step-decayed learning rate."""

from __future__ import annotations

from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue exactly where it stopped.

    The data stream and the step keys are pure functions of `step`, so this is all a checkpoint
    holds.

    Attributes:
        step: int32 scalar, the number of updates done so far.
        params: the model's `nnx.Param` state.
        model_state: the model's other state that training updates: `nnx.BatchStat` (batch
            norm's running statistics); empty for models without batch norm.
        opt_state: the optax state of `params`.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any, Any]:
    """(graphdef, params, model_state, constants): the model as the train state holds it.

    `params` are the `nnx.Param`s (trained), `model_state` the `nnx.BatchStat`s (updated by
    the forward pass in training), `constants` everything else (e.g. RNG counters of modules
    that own an `nnx.Rngs`), held fixed by the steps.
    """
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
    """The paper's piecewise-constant schedule.

    Either `lr_decay_every` (lr * factor ** (step // lr_decay_every), MNIST and SVHN) or, when
    the config has a non-empty `lr_boundaries` list, lr * factor ** (number of boundaries
    passed) (CUB: 10k, 20k, 25k).

    Args:
        train_config: `config.train`, with learning_rate, lr_decay_factor and lr_decay_every
            or lr_boundaries.

    Returns:
        An optax schedule, step -> learning rate.

    Example:
        >>> cfg = ml_collections.ConfigDict(dict(learning_rate=0.01, lr_decay_every=50_000,
        ...                                      lr_decay_factor=0.1))
        >>> float(learning_rate_schedule(cfg)(100_000))  # 0.01 / 10 / 10
        0.0001
    """
    boundaries = list(train_config.get("lr_boundaries", None) or [])
    if boundaries:
        if any(b <= 0 for b in boundaries) or boundaries != sorted(boundaries):
            raise ValueError(
                f"train.lr_boundaries must be increasing positive steps, got {boundaries}")
        return optax.piecewise_constant_schedule(
            train_config.learning_rate,
            {int(b): train_config.lr_decay_factor for b in boundaries})
    if train_config.lr_decay_every <= 0:
        raise ValueError(
            f"train.lr_decay_every must be positive, got {train_config.lr_decay_every}"
        )
    return optax.exponential_decay(
        init_value=train_config.learning_rate,
        transition_steps=train_config.lr_decay_every,
        decay_rate=train_config.lr_decay_factor,
        staircase=True,
    )


def transformer_labels(model: nnx.Module) -> Any:
    """"loc" for every parameter inside any `SpatialTransformer` of `model`, "base" otherwise.

    Transformers are found by type wherever they sit in the module graph (one on the input,
    several inside the network, parallel ones), so the localisation learning rate reaches all
    of them: their localisation nets, regression layers and learned control points.

    Returns:
        A pytree shaped like `nnx.state(model, nnx.Param)` of "loc" / "base" strings.
    """
    from stn_jax.transformer import SpatialTransformer  # flax-level module; lazy like the rest.

    prefixes = [tuple(path) for path, node in nnx.iter_graph(model)
                if isinstance(node, SpatialTransformer)]

    def label(path, _):
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        inside = any(keys[:len(p)] == p for p in prefixes)
        return "loc" if inside else "base"

    return jax.tree_util.tree_map_with_path(label, nnx.state(model, nnx.Param))


def make_optimizer(train_config: ml_collections.ConfigDict, *,
                   param_labels: Any = None) -> optax.GradientTransformation:
    """SGD (with optional momentum and L2 weight decay) on `learning_rate_schedule`.

    Args:
        train_config: `config.train`, with momentum, weight_decay, the schedule's fields and
            optionally loc_lr_multiplier (default 1).
        param_labels: `transformer_labels(model)`; needed when loc_lr_multiplier != 1.

    Returns:
        The optax transformation. momentum=0 is plain SGD (no momentum buffer in the state);
        weight_decay adds weight_decay * param to the gradient (L2, as in Caffe), so it is scaled
        by the learning rate like the gradient. A loc_lr_multiplier other than 1 scales the
        updates of the spatial transformers' parameters, which is the same as scaling their
        learning rate (SGD and momentum are linear), as the paper does for SVHN (0.1) and CUB
        (1e-4); with 1 the state is plain SGD's.
    """
    sgd = optax.sgd(
        learning_rate_schedule(train_config), momentum=train_config.momentum or None
    )
    if train_config.weight_decay:
        sgd = optax.chain(optax.add_decayed_weights(train_config.weight_decay), sgd)
    multiplier = train_config.get("loc_lr_multiplier", 1.0)
    if not multiplier > 0:
        raise ValueError(f"train.loc_lr_multiplier must be positive, got {multiplier}")
    if multiplier == 1:
        return sgd
    if param_labels is None:
        raise ValueError("train.loc_lr_multiplier != 1 needs param_labels "
                         "(transformer_labels(model))")
    return optax.multi_transform(
        {"base": sgd, "loc": optax.chain(sgd, optax.scale(multiplier))}, param_labels)


def create_train_state(params: Any, model_state: Any,
                       tx: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params))

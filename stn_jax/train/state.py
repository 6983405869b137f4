"""The train state and the optimiser of the paper: SGD with a step-decayed learning rate."""

from __future__ import annotations

from typing import Any

import flax
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
        params: the model's `nnx.Param` state (from `nnx.split(model, nnx.Param, ...)`).
        opt_state: the optax state of `params`.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
    """The paper's piecewise-constant schedule: lr * factor ** (step // lr_decay_every).

    Args:
        train_config: `config.train`, with learning_rate, lr_decay_every, lr_decay_factor.

    Returns:
        An optax schedule, step -> learning rate.

    Example:
        >>> cfg = ml_collections.ConfigDict(dict(learning_rate=0.01, lr_decay_every=50_000,
        ...                                      lr_decay_factor=0.1))
        >>> float(learning_rate_schedule(cfg)(100_000))  # 0.01 / 10 / 10
        0.0001
    """
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


def transformer_labels(params: Any) -> Any:
    """"loc" for every parameter under a `transformer` attribute (the spatial transformer's
    localisation net, regression layer and learned control points), "base" for the rest."""

    def label(path, _):
        inside = any(getattr(key, "key", None) == "transformer" for key in path)
        return "loc" if inside else "base"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD (with optional momentum and L2 weight decay) on `learning_rate_schedule`.

    Args:
        train_config: `config.train`, with momentum, weight_decay, the schedule's fields and
            optionally loc_lr_multiplier (default 1).

    Returns:
        The optax transformation. momentum=0 is plain SGD (no momentum buffer in the state);
        weight_decay adds weight_decay * param to the gradient (L2, as in Caffe), so it is scaled
        by the learning rate like the gradient. A loc_lr_multiplier other than 1 scales the
        updates of the spatial transformers' parameters (`transformer_labels`), which is the
        same as scaling their learning rate (SGD and momentum are linear), as the paper does for
        SVHN (0.1) and CUB (1e-4); with 1 the state is plain SGD's.
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
    return optax.multi_transform(
        {"base": sgd, "loc": optax.chain(sgd, optax.scale(multiplier))}, transformer_labels)


def create_train_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0 for `params`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

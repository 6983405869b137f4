"""Training for the distorted-MNIST experiments: state, steps, loop, checkpoints, pictures.

Example:
    >>> from stn_jax.train import train_and_evaluate
    >>> train_and_evaluate(config, "/tmp/run")  # config from configs/mnist_*.py
"""

from stn_jax.train.loop import train_and_evaluate
from stn_jax.train.metrics import NonFiniteLossError
from stn_jax.train.state import (
    TrainState,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
)

__all__ = [
    "NonFiniteLossError",
    "TrainState",
    "create_train_state",
    "learning_rate_schedule",
    "make_optimizer",
    "train_and_evaluate",
]

"""Family-agnostic training: state, steps, loop, checkpoints, metrics, pictures.

Example:
    >>> from stn_jax.train import train_and_evaluate
    >>> train_and_evaluate(config, "/tmp/run")  # config from configs/*.py (config.task names
    ...                                         # the experiment family: stn_jax.tasks)
    >>> load_run("/tmp/run").model  # the trained model, in eval mode
"""

from stn_jax.train.loop import (
    PREEMPTED_EXIT_CODE,
    Run,
    check_config,
    load_run,
    train_and_evaluate,
)
from stn_jax.train.metrics import NonFiniteLossError
from stn_jax.train.state import (
    TrainState,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    split_model,
    transformer_labels,
)

__all__ = [
    "NonFiniteLossError",
    "PREEMPTED_EXIT_CODE",
    "Run",
    "TrainState",
    "check_config",
    "create_train_state",
    "learning_rate_schedule",
    "load_run",
    "make_optimizer",
    "split_model",
    "train_and_evaluate",
    "transformer_labels",
]

"""Orbax checkpoints of the TrainState under `workdir/checkpoints/<step>/`.

Saves are synchronous: the MNIST state is small, and a save that has returned is on disk,
which is what a SIGTERM handler or a crash right after it needs. Orbax's own INFO logging
(dozens of lines a save) is held back to warnings so the training progress stays readable.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from absl import logging
import jax
import orbax.checkpoint as ocp

from stn_jax.train.state import TrainState


@contextlib.contextmanager
def _orbax_quiet() -> Iterator[None]:
    verbosity = logging.get_verbosity()
    logging.set_verbosity(min(verbosity, logging.WARNING))  # absl: lower is quieter.
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def make_manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A CheckpointManager for `workdir/checkpoints`, keeping the newest `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    with _orbax_quiet():
        return ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
        )


def save(manager: ocp.CheckpointManager, state: TrainState) -> int:
    """Saves `state` under its own step (a no-op if that step is already saved); returns it."""
    step = int(jax.device_get(state.step))
    if step not in manager.all_steps():
        with _orbax_quiet():
            manager.save(step, args=ocp.args.StandardSave(state))
        logging.info("saved checkpoint %d in %s", step, manager.directory)
    return step


def restore_latest(
    manager: ocp.CheckpointManager,
    like: TrainState,
    sharding: jax.sharding.Sharding | None = None,
) -> TrainState | None:
    """The newest saved state, shaped like `like` and placed with `sharding`; None if none.

    Args:
        manager: from `make_manager`.
        like: a TrainState with the same tree structure, shapes and dtypes (e.g. a fresh one).
        sharding: where to put the restored arrays (default: each leaf's sharding in `like`).

    Returns:
        The restored TrainState, or None when `manager` has no checkpoint.

    Example:
        >>> state = restore_latest(make_manager(workdir), fresh_state) or fresh_state
    """
    step = manager.latest_step()
    if step is None:
        return None

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding)

    with _orbax_quiet():
        restored = manager.restore(
            step, args=ocp.args.StandardRestore(jax.tree.map(abstract, like))
        )
    logging.info("restored checkpoint %d from %s", step, manager.directory)
    return restored


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for any save in flight and releases the manager."""
    with _orbax_quiet():
        manager.close()

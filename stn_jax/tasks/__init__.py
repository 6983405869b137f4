"""Experiment families as tasks: one module each, picked by name from `config.task`.

Example:
    >>> task = get_task(config)          # config.task == "mnist" -> stn_jax.tasks.mnist.TASK
    >>> dataset = task.make_dataset()
"""

from __future__ import annotations

import importlib
import pkgutil

import ml_collections

from stn_jax.tasks.base import Dataset, Task


def task_names() -> tuple[str, ...]:
    """The task modules present in this package (every module but `base`)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"))


def get_task(config: ml_collections.ConfigDict) -> Task:
    """The task of `config.task`, built with the whole config.

    Raises:
        ValueError: `config.task` names no task module.
    """
    name = config.get("task", None)
    names = task_names()
    if name not in names:
        raise ValueError(f"config.task must be one of {names}, got {name!r}")
    module = importlib.import_module(f"stn_jax.tasks.{name}")
    return module.TASK(config)


__all__ = ["Dataset", "Task", "get_task", "task_names"]

"""Small helpers for the training metrics: finiteness check, averaging, durations, JSON."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

# Metrics whose non-finite value means the run has diverged.
_MUST_BE_FINITE = ("loss", "param_norm")


class NonFiniteLossError(FloatingPointError):
    """The loss (or the parameters after an update) stopped being finite."""


def check_finite(history: Sequence[tuple[int, dict]], *, last_checkpoint: int | None) -> None:
    """Raises NonFiniteLossError at the first step whose loss or parameters are not finite.

    Args:
        history: (step, metrics) pairs, metrics as host scalars, `step` being the number of
            updates done after that step (1 for the first).
        last_checkpoint: the newest saved step, named in the message (None: no checkpoint yet).
    """
    for step, metrics in history:
        values = {k: float(metrics[k]) for k in _MUST_BE_FINITE if k in metrics}
        if not all(math.isfinite(v) for v in values.values()):
            saved = ("no checkpoint was saved yet" if last_checkpoint is None
                     else f"the last good checkpoint (step {last_checkpoint}) is left untouched")
            raise NonFiniteLossError(
                f"Non-finite loss at step {step} "
                f"({', '.join(f'{k}={v}' for k, v in values.items())}): training stopped; "
                f"{saved}. Lower train.learning_rate or check the data."
            )


def mean_metrics(history: Sequence[tuple[int, dict]]) -> dict[str, float]:
    """The mean of each metric over `history` ((step, metrics) pairs)."""
    keys = history[0][1].keys()
    return {k: float(np.mean([float(m[k]) for _, m in history])) for k in keys}


def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s' or '12s'.

    Example:
        >>> format_duration(3725)
        '1h02m'
    """
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def write_json(path: str, data: dict[str, Any]) -> None:
    """Writes `data` as indented JSON, atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)

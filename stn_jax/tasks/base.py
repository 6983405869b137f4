"""What a task (one experiment family) gives the family-agnostic training loop.

The loop (`stn_jax.train.loop`) never names a family. It reads `config.task` (e.g. "mnist"),
imports `stn_jax.tasks.<name>` and instantiates its `TASK` class with the config. Everything
family-specific lives behind this interface:

    task = get_task(config)                       # stn_jax.tasks.get_task
    task.check_config()                           # cheap: every name and number, before any work
    data = task.make_dataset()                    # a `Dataset` (below), from config.data
    model = task.create_model(data, rngs=rngs)    # an nnx.Module, from config.model
    out = model(images, rngs=...)                 # the model's outputs (any pytree; e.g. logits)
    loss, metrics = task.loss(out, batch)         # in the jitted train step
    sums = task.eval_sums(out, batch)             # in the jitted eval step, masked sums
    final = task.summarize(totals)                # host: test_error_pct and friends
    picture = task.picture(model, examples, ...)  # host: an RGB uint8 array, or None

Models. `model(x, *, rngs=None)` maps a batch of images to the task's outputs. Dropout draws
from `rngs` (an `nnx.Rngs` the train step builds from its key; None in evaluation); batch norm
keeps its statistics in `nnx.BatchStat` variables, which the train state carries. The loop
switches modes with `model.train()` / `model.eval()` (flax.nnx), so evaluation runs without
dropout and with the running statistics. A model with spatial transformers defines
`transformer_views(x) -> list[dict]`, one dict per transformer: "name", "output" (B,H',W',C)
and "grid" (B,H',W',2), the grid in normalised (x, y) coordinates *of the input image* (a
transformer deep in the network has its grid composed back onto the input), for pictures.
The localisation learning-rate multiplier reaches every `stn_jax.SpatialTransformer` in the
model, found by type wherever it sits.

Datasets. Every batch is a pure function of the step (resume is exact), built per process:
`train_batch(step, batch_size, sharding=...)` returns the *global* batch as jax.Arrays with
that sharding, each process having built only its own rows (`stn_jax.data.batching`).
`test_batches(batch_size, sharding=...)` yields global padded batches with a "mask" leaf
(1 real, 0 padding), every process taking part in each. `picture_examples(count)` returns a
few fixed test examples as host numpy arrays, the same on every process.

Adding a family: a module `stn_jax/tasks/<name>.py` defining `TASK = <Task subclass>`, its
configs (`configs/<name>*.py`, setting `config.task = "<name>"`) and its tests. No edit to the
loop.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

from flax import nnx
import jax
import ml_collections
import numpy as np


class Dataset(Protocol):
    """The data side of a task (see the module docstring)."""

    source: str  # Where the data came from (e.g. "tfds", "bundled", "dir"), for metrics.json.
    num_train: int  # Training examples.
    num_test: int  # Test (or validation) examples evaluated.

    def train_batch(self, step: int, batch_size: int, *, sharding) -> dict[str, jax.Array]:
        """The global training batch of `step` (pure in the step), sharded by `sharding`."""
        ...

    def test_batches(self, batch_size: int, *, sharding) -> Iterator[dict[str, jax.Array]]:
        """Global padded evaluation batches with a "mask" leaf, covering the test set once."""
        ...

    def picture_examples(self, count: int) -> dict[str, np.ndarray]:
        """`count` fixed test examples (host arrays, identical on every process)."""
        ...


class Task:
    """Base class of a task: one experiment family. Subclasses set `name` and override all.

    Attributes:
        config: the whole run config (`config.data`, `config.model`, `config.train`, ...).
    """

    name: str = ""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def check_config(self) -> None:
        """Raises ValueError naming the field for any bad name or value, before any work."""
        raise NotImplementedError

    def make_dataset(self) -> Dataset:
        """The dataset of `config.data` (reads or generates data; may take a while)."""
        raise NotImplementedError

    def create_model(self, dataset: Dataset, *, rngs: nnx.Rngs) -> nnx.Module:
        """The model of `config.model`, sized for `dataset`."""
        raise NotImplementedError

    def loss(self, outputs: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        """(mean loss, {metric: scalar}) of a training batch; jitted. Must include "accuracy"
        or another per-batch quality measure for the progress line."""
        raise NotImplementedError

    def eval_sums(self, outputs: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Sums over the real examples (`batch["mask"]`) that add up over batches; jitted.
        Must include "count" (the number of real examples)."""
        raise NotImplementedError

    def summarize(self, totals: dict[str, np.ndarray]) -> dict[str, Any]:
        """Final metrics from the summed `eval_sums`; must include "test_error_pct" (the
        number the paper's tables report, in percent) and "test_loss"."""
        raise NotImplementedError

    def picture(self, model: nnx.Module, examples: dict[str, np.ndarray], *,
                title: str) -> np.ndarray | None:
        """An RGB uint8 picture of what the model (in eval mode) does to `examples`."""
        return None

    def describe(self, dataset: Dataset, model: nnx.Module) -> str:
        """One log line saying what is trained on what."""
        return f"{self.name}: {type(model).__name__} on {dataset.source} data"

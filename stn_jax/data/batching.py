"""Global batches from per-process slices: what every dataset of every task uses.

On a pod (many hosts) each process builds only its own rows of each global batch; the rows
come from the sharding (which devices this process addresses), so the same code runs on one
process (all rows) and on many. A dataset typically:

    rows = local_rows(sharding, batch_size)             # e.g. slice(64, 128) on process 1 of 4
    index = global_indices(step, batch_size)[rows]      # a pure function of the step
    local = {"image": images[index], "label": labels[index]}
    return assemble(local, sharding, batch_size)        # jax.Arrays of the global batch

`assemble` is `jax.make_array_from_process_local_data` over every leaf, so nothing is copied
between hosts. Leaves that a jitted generator will turn into images (e.g. raw digits) can be
assembled first and generated on the devices afterwards, with the batch sharding as the jit's
`out_shardings`: the images are then never on the host.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Iterator, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def local_rows(sharding: jax.sharding.Sharding, batch_size: int) -> slice:
    """The contiguous rows of a `batch_size` global batch that this process's devices hold.

    Args:
        sharding: the batch sharding (leading axis split over the mesh's data axis).
        batch_size: rows of the global batch.

    Returns:
        A slice of `range(batch_size)`; all of it on a single process.

    Raises:
        ValueError: the process's rows are not one contiguous block (a mesh whose device order
            interleaves processes), which `assemble` cannot fill from one local array.

    Example:
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        >>> local_rows(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")), 8)
        slice(0, 8, None)
    """
    covered = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows = index[0] if index else slice(None)
        covered.update(range(*rows.indices(batch_size)))
    start, stop = min(covered), max(covered) + 1
    if covered != set(range(start, stop)):
        raise ValueError(
            f"this process's devices hold rows {sorted(covered)[:8]}... of the batch, not one "
            "contiguous block: build the mesh from jax.devices() in their order")
    return slice(start, stop)


def assemble(local: Any, sharding: jax.sharding.Sharding, batch_size: int) -> Any:
    """The global batch (a pytree of jax.Arrays) from this process's rows of every leaf.

    Args:
        local: pytree of arrays whose leading axis holds the rows `local_rows(sharding,
            batch_size)` of the global batch.
        sharding: the batch sharding.
        batch_size: rows of the global batch.
    """
    rows = local_rows(sharding, batch_size)
    n_local = rows.stop - rows.start

    def one(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.shape[0] != n_local:
            raise ValueError(f"a local leaf has {x.shape[0]} rows, this process holds {n_local}")
        return jax.make_array_from_process_local_data(sharding, x, (batch_size,) + x.shape[1:])

    return jax.tree.map(one, local)


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads every leaf of `batch` to `size` rows with zeros and adds "mask" (1 real, 0 pad).

    Evaluation keeps one compiled shape this way; metrics are sums weighted by the mask.

    Example:
        >>> pad_batch({"label": np.array([3, 4])}, 4)["mask"]
        array([1., 1., 0., 0.], dtype=float32)
    """
    n = len(next(iter(batch.values())))
    if n > size:
        raise ValueError(f"batch of {n} rows does not fit size={size}")
    out = {k: np.pad(v, [(0, size - n)] + [(0, 0)] * (np.ndim(v) - 1)) for k, v in batch.items()}
    out["mask"] = np.pad(np.ones(n, np.float32), (0, size - n))
    return out


def prefetch(make: Callable[[int], T], steps: Iterator[int], *, size: int = 2) -> Iterator[T]:
    """Yields `make(step)` for each step, building up to `size` ahead in a background thread.

    For host-side loaders (decoding, cropping); the batch of a step stays a pure function of
    the step, so resuming at any step gives the same stream. An exception in `make` is raised
    in the consumer at the step it belongs to.

    Example:
        >>> list(prefetch(lambda s: s * s, iter(range(4))))
        [0, 1, 4, 9]
    """
    queue: collections.deque = collections.deque()
    ready = threading.Condition()
    done = threading.Event()

    def work():
        for step in steps:
            with ready:
                while len(queue) >= size and not done.is_set():
                    ready.wait()
            if done.is_set():
                return
            try:
                item = (True, make(step))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer.
                item = (False, e)
            with ready:
                queue.append(item)
                ready.notify_all()
            if not item[0]:
                return
        with ready:
            queue.append(None)
            ready.notify_all()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            with ready:
                while not queue:
                    ready.wait()
                item = queue.popleft()
                ready.notify_all()
            if item is None:
                return
            ok, value = item
            if not ok:
                raise value
            yield value
    finally:
        done.set()
        with ready:
            ready.notify_all()

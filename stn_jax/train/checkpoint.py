"""Orbax checkpoints of the train state under `workdir/checkpoints/<step>/`, checked on restore.

Saves are synchronous: the MNIST state is small, and a save that has returned is on disk,
which is what a SIGTERM handler or a crash right after it needs. Orbax's own INFO logging
(dozens of lines a save) is held back to warnings so the training progress stays readable.

Beside orbax's files each step folder holds `state_sha256.json`: the path, shape, dtype and
SHA-256 of every leaf of the saved state. `restore_latest` checks the restored state against it,
so damage that orbax reads without complaint (a few overwritten bytes in a data file) is caught.
A checkpoint that cannot be restored (unreadable, empty, or a checksum that differs) is named in
one warning line (step, file, cause), moved to `checkpoints/corrupt/<step>-<reason>/` (never
deleted) and the next newest one is tried; orbax's own tracebacks of the failed attempt are kept
off the console.

Several processes (`jax.distributed`): every process calls `save` and `restore_latest` (orbax's
saves and restores are collective); process 0 alone writes the checksum files and moves damaged
checkpoints aside while the others wait for it at a barrier, and a checkpoint counts as good only
if it restored and verified on every process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging as py_logging
import os
import re
import sys
from typing import Any, Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

CHECKSUM_FILE = "state_sha256.json"
CORRUPT_DIR = "corrupt"
# orbax's JSON files, read before orbax is asked to restore, so that an emptied one is named.
_ORBAX_JSON_FILES = ("_CHECKPOINT_METADATA", os.path.join("default", "_METADATA"))


@contextlib.contextmanager
def _orbax_quiet(level: int = logging.WARNING) -> Iterator[None]:
    """Holds absl logging (orbax's) at `level` or quieter, and asyncio's with it."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(min(verbosity, level))  # absl: lower is quieter.
    asyncio_logger = py_logging.getLogger("asyncio")
    asyncio_level = asyncio_logger.level
    if level < logging.WARNING:
        asyncio_logger.setLevel(py_logging.CRITICAL + 1)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        asyncio_logger.setLevel(asyncio_level)


class _UnretrievedReadFilter(py_logging.Filter):
    """Drops asyncio's "exception was never retrieved" records of failed checkpoint reads."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("never retrieved" in message
                    and ("OCDBT" in message or "TensorStore" in message))


def _drop_orbax_leftovers() -> None:
    """Installs (once) an unraisable-exception hook that drops what a failed restore leaves.

    When one read of a restore fails, orbax closes its event loop while tensorstore's other reads
    are still in flight; as they finish, each reports "RuntimeError: Event loop is closed" or an
    abandoned orbax coroutine through `sys.unraisablehook`, or asyncio logs "Future exception was
    never retrieved" with tensorstore's error, at any later time (hundreds of lines of
    tracebacks). The failure itself is named in `restore_latest`'s warning line. Everything else
    goes to the previous hook and is logged as before.
    """
    asyncio_logger = py_logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_UnretrievedReadFilter())
    if getattr(sys.unraisablehook, "stn_jax_orbax_filter", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        error, obj = unraisable.exc_value, unraisable.object
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        code = getattr(obj, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook.stn_jax_orbax_filter = True
    sys.unraisablehook = hook


def make_manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A CheckpointManager for `workdir/checkpoints`, keeping the newest `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    # Quieter than warnings: orbax warns about damaged step folders, which restore_latest names.
    with _orbax_quiet(logging.ERROR):
        return ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
        )


# ----------------------------------------------------------------------------- checksums


def _host_array(x: Any) -> np.ndarray:
    """The whole of leaf `x` on this host (gathered from the other processes if sharded)."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:  # Every process holds all of it already.
                return np.asarray(x.addressable_shards[0].data)
            # Collective: every process hashes the same global array.
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def state_record(state: Any) -> dict[str, dict[str, Any]]:
    """Path -> {shape, dtype, sha256} for every leaf of `state`.

    The digest is of the leaf's bytes in C order, so it does not depend on how the array is
    sharded. With several processes this is collective (leaves split over processes are
    gathered).

    Args:
        state: any pytree of arrays.

    Returns:
        A JSON-ready dict keyed by `jax.tree_util.keystr` of each leaf's path.

    Example:
        >>> state_record({"w": jnp.zeros((2, 3))})["['w']"]["shape"]
        [2, 3]
    """
    record = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = np.asarray(_host_array(leaf), order="C")  # ascontiguousarray makes 0-d 1-d.
        record[jax.tree_util.keystr(path)] = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        }
    return record


def _layout(record: dict[str, dict[str, Any]]) -> dict[str, tuple]:
    return {path: (tuple(v["shape"]), v["dtype"]) for path, v in record.items()}


def _like_layout(like: Any) -> dict[str, tuple]:
    """`_layout` of the state that restoring into `like` gives (PRNG keys are stored as data)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(like)[0]:
        x = jax.ShapeDtypeStruct(np.shape(x), x.dtype)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.eval_shape(jax.random.key_data, x)
        out[jax.tree_util.keystr(path)] = (tuple(x.shape), str(np.dtype(x.dtype)))
    return out


# ----------------------------------------------------------------------------- save


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def save(manager: ocp.CheckpointManager, state: Any) -> int:
    """Saves `state` under its own step (a no-op if that step is already saved); returns it.

    Writes `state_sha256.json` (see `state_record`) into the step folder after orbax's files.
    Every process must call it.

    Args:
        manager: from `make_manager`.
        state: a pytree of arrays with an int scalar `step` attribute (e.g. a TrainState).

    Returns:
        The step saved.
    """
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return step
    record = state_record(state)
    with _orbax_quiet():
        manager.save(step, args=ocp.args.StandardSave(state))
    if jax.process_index() == 0:
        directory = os.path.join(os.fspath(manager.directory), str(step))
        path = os.path.join(directory, CHECKSUM_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"step": step, "leaves": record}, f, indent=1)
        os.replace(tmp, path)  # All or nothing: a crash leaves no half-written record.
    _sync(f"stn_jax checkpoint saved {step}")
    logging.info("saved checkpoint %d in %s", step, manager.directory)
    return step


# ----------------------------------------------------------------------------- restore


class _Damaged(Exception):
    """A checkpoint that cannot be used: `file` is what is wrong, `reason` a slug for its folder."""

    def __init__(self, file: str, cause: str, reason: str):
        super().__init__(f"{file}: {cause}")
        self.file, self.cause, self.reason = file, cause, reason


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (orbax wraps tensorstore's message twice)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return error


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_record(step_dir: str) -> dict[str, Any] | None:
    """The checksum record of a step folder; None if it has none (a crash before it was written,
    or a checkpoint of an older stn_jax); raises _Damaged if it is unreadable."""
    path = os.path.join(step_dir, CHECKSUM_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        leaves = record["leaves"]
        _layout(leaves)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Damaged(path, f"unreadable checksum record ({_one_line(e)})", "unreadable") from e
    return leaves


def _check_files(step_dir: str) -> None:
    """Raises _Damaged for an empty step folder or an unreadable orbax JSON file."""
    if not os.path.isdir(step_dir) or not os.listdir(step_dir):
        raise _Damaged(step_dir, "empty step folder", "empty")
    for name in _ORBAX_JSON_FILES:
        path = os.path.join(step_dir, name)
        if not os.path.exists(path):
            continue  # Orbax names what it misses itself; its layout varies between versions.
        try:
            with open(path) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            size = os.path.getsize(path)
            raise _Damaged(path, f"unreadable JSON, {size} bytes ({_one_line(e)})",
                           "unreadable") from e


def _file_named_in(message: str, step_dir: str) -> str:
    """The path under `step_dir` that an orbax/tensorstore message names, else `step_dir`."""
    for quoted in re.findall(r'"([^"]+)"', message):
        if quoted.startswith(step_dir):
            return quoted
    return step_dir


def _restore_checked(manager: ocp.CheckpointManager, step: int, like: Any,
                     sharding: jax.sharding.Sharding | None) -> Any:
    """Restores `step` and verifies it; raises _Damaged, or ValueError for a foreign layout."""
    step_dir = os.path.join(os.fspath(manager.directory), str(step))
    _check_files(step_dir)
    record = _read_record(step_dir)
    if record is not None:
        saved, wanted = _layout(record), _like_layout(like)
        if saved != wanted:
            diff = sorted(set(saved.items()) ^ set(wanted.items()))[:3]
            raise ValueError(
                f"checkpoint {step} in {manager.directory} holds a state of another layout than "
                f"this run's (first differences, (path, (shape, dtype)): {diff}); it was written "
                "by another model or config: use another workdir, or move that one away"
            )

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=sharding or getattr(x, "sharding", None))

    _drop_orbax_leftovers()
    try:
        with _orbax_quiet(logging.FATAL):
            restored = manager.restore(
                step, args=ocp.args.StandardRestore(jax.tree.map(abstract, like))
            )
    except Exception as e:  # pylint: disable=broad-except
        cause = _one_line(_root_cause(e))
        raise _Damaged(_file_named_in(cause, step_dir), cause, "unreadable") from e
    if record is None:
        logging.warning(
            "checkpoint %d (%s) has no %s (written by an older stn_jax, or the process stopped "
            "between orbax's save and the record): restored without verifying it",
            step, step_dir, CHECKSUM_FILE)
        return restored
    got = state_record(restored)
    for path, leaf in record.items():
        if got[path]["sha256"] != leaf["sha256"]:
            raise _Damaged(
                os.path.join(step_dir, "default"),
                f"leaf {path} restored with SHA-256 {got[path]['sha256'][:12]}..., saved with "
                f"{leaf['sha256'][:12]}... ({CHECKSUM_FILE}): its data was changed on disk",
                "checksum")
    return restored


def _everyone_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (collective with several processes)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
    return bool(np.all(flags))


def _move_aside(manager: ocp.CheckpointManager, step: int, reason: str) -> str:
    """Moves step folder `step` to checkpoints/corrupt/<step>-<reason>[-k]; returns where to."""
    root = os.fspath(manager.directory)
    target = os.path.join(root, CORRUPT_DIR, f"{step}-{reason}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        base, k = target, 1
        while os.path.exists(target):
            k += 1
            target = f"{base}-{k}"
        os.replace(os.path.join(root, str(step)), target)
    _sync(f"stn_jax checkpoint moved aside {step}")
    return target


def _reload(manager: ocp.CheckpointManager) -> None:
    with _orbax_quiet(logging.ERROR):
        manager.reload()


def restore_latest(
    manager: ocp.CheckpointManager,
    like: Any,
    sharding: jax.sharding.Sharding | None = None,
) -> Any | None:
    """The newest good saved state, shaped like `like` and placed with `sharding`; None if none.

    Checkpoints that cannot be restored, or whose restored leaves differ from their
    `state_sha256.json`, are moved to `checkpoints/corrupt/<step>-<reason>/`, each named in one
    warning line, and the next newest is tried. Every process must call it.

    Args:
        manager: from `make_manager`.
        like: a pytree with the same structure, shapes and dtypes as the saved state (e.g. a
            fresh TrainState).
        sharding: where to put the restored arrays (default: each leaf's sharding in `like`).

    Returns:
        The restored state, or None when `manager` has no good checkpoint.

    Raises:
        ValueError: the newest checkpoint's record shows another layout than `like` (another
            model or config on the same workdir); nothing is moved.

    Example:
        >>> state = restore_latest(make_manager(workdir), fresh_state) or fresh_state
    """
    _reload(manager)  # See the folder as it is now, not as when the manager was made.
    for step in sorted(manager.all_steps(), reverse=True):
        damage, restored = None, None
        try:
            restored = _restore_checked(manager, step, like, sharding)
        except _Damaged as e:
            damage = e
        if _everyone_ok(damage is None):
            logging.info("restored checkpoint %d from %s", step, manager.directory)
            return restored
        reason = damage.reason if damage is not None else "other-process"
        target = _move_aside(manager, step, reason)
        if damage is not None:
            logging.warning("checkpoint %d cannot be restored: %s: %s; moved to %s",
                            step, damage.file, damage.cause, target)
        else:
            logging.warning("checkpoint %d could not be restored on another process; moved to "
                            "%s", step, target)
        _reload(manager)
    return None


def close(manager: ocp.CheckpointManager) -> None:
    """Waits for any save in flight and releases the manager."""
    with _orbax_quiet():
        manager.close()

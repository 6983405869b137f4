"""Checkpoints: round trip, checksums, and damaged checkpoints moved aside for the newest good one.

The damage cases are those a user hit: a truncated data file, an emptied `_METADATA`, an emptied
step folder, and 8 bytes overwritten inside a data file (which orbax restores without a word).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stn_jax.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict
    model_state: dict


_W = np.random.default_rng(0).standard_normal((20, 30)).astype(np.float32)
# Random bits, so incompressible: orbax's zstd stores them raw, and a test finds them on disk.
_NOISE = np.random.default_rng(1).integers(-2**31, 2**31, 600).astype(np.int32)


def _state(step: int, offset: float = 0.0) -> _State:
    return _State(
        step=jnp.array(step, jnp.int32),
        params={"w": jnp.asarray(_W + np.float32(offset)),
                "b": jnp.full((7,), 0.5 + offset, jnp.float32)},
        model_state={"count": jnp.array([step, 2 * step], jnp.int32),
                     "noise": jnp.asarray(_NOISE + np.int32(step))},
    )


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def _data_files(step_dir: pathlib.Path) -> list[str]:
    """Orbax's array data files (the files inside `d/` folders) of a step."""
    files = [f for f in glob.glob(str(step_dir / "**" / "d" / "*"), recursive=True)
             if os.path.isfile(f)]
    assert files, sorted(str(p) for p in step_dir.rglob("*"))
    return files


def _truncate_data(step_dir: pathlib.Path) -> None:
    path = max(_data_files(step_dir), key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 2)


def _empty_metadata(step_dir: pathlib.Path) -> None:
    path = step_dir / "default" / "_METADATA"
    assert path.stat().st_size > 0
    path.write_bytes(b"")


def _empty_folder(step_dir: pathlib.Path) -> None:
    for child in step_dir.iterdir():
        subprocess.run(["rm", "-rf", str(child)], check=True)


def _overwrite_inside_noise(step_dir: pathlib.Path) -> None:
    """Overwrites 8 bytes in the middle of leaf `noise`'s bytes at step 5 on disk."""
    needle = (_NOISE + np.int32(5))[300:308].tobytes()
    for path in _data_files(step_dir):
        data = pathlib.Path(path).read_bytes()
        at = data.find(needle)
        if at >= 0:
            with open(path, "r+b") as f:
                f.seek(at + 8)
                f.write(b"\x00\x00\xc0\x7f\x00\x00\xc0\x7f")  # two of w's values become NaN
            return
    pytest.fail("leaf w's bytes were not found raw in any data file")


@pytest.fixture
def two_checkpoints(tmp_path):
    """Steps 3 (offset 0) and 5 (offset 1) saved under tmp_path; returns (dir, state 3)."""
    manager = checkpoint.make_manager(str(tmp_path))
    assert checkpoint.save(manager, _state(3)) == 3
    assert checkpoint.save(manager, _state(5, offset=1.0)) == 5
    checkpoint.close(manager)
    return tmp_path / "checkpoints", _state(3)


def test_round_trip_and_checksum_record(two_checkpoints):
    directory, _ = two_checkpoints
    manager = checkpoint.make_manager(str(directory.parent))
    restored = checkpoint.restore_latest(manager, _state(0))
    checkpoint.close(manager)
    assert _equal(restored, _state(5, offset=1.0))
    record = json.loads((directory / "5" / checkpoint.CHECKSUM_FILE).read_text())
    assert record["step"] == 5
    w = _W + np.float32(1.0)
    assert record["leaves"][".params['w']"] == {
        "shape": [20, 30], "dtype": "float32", "sha256": hashlib.sha256(w.tobytes()).hexdigest()}
    assert record["leaves"][".step"]["sha256"] == hashlib.sha256(
        np.int32(5).tobytes()).hexdigest()
    assert set(record["leaves"]) == {".step", ".params['b']", ".params['w']",
                                     ".model_state['count']", ".model_state['noise']"}


@pytest.mark.parametrize("damage, reason, named_file, cause", [
    (_truncate_data, "unreadable", "5/default", "OUT_OF_RANGE"),
    (_empty_metadata, "unreadable", "5/default/_METADATA", "unreadable JSON, 0 bytes"),
    (_empty_folder, "empty", "5", "empty step folder"),
    (_overwrite_inside_noise, "checksum", "5/default",
     "leaf .model_state['noise'] restored with SHA-256"),
])
def test_damaged_newest_is_moved_aside_and_older_restored(two_checkpoints, caplog, capfd,
                                                          damage, reason, named_file, cause):
    directory, state3 = two_checkpoints
    damage(directory / "5")
    files_before = sorted(p.relative_to(directory / "5") for p in (directory / "5").rglob("*"))
    manager = checkpoint.make_manager(str(directory.parent))
    with caplog.at_level(logging.INFO):
        restored = checkpoint.restore_latest(manager, _state(0))
    assert _equal(restored, state3)
    assert manager.all_steps() == [3]
    # Moved aside whole, never deleted.
    moved = directory / "corrupt" / f"5-{reason}"
    assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == files_before
    assert not (directory / "5").exists()
    # One warning line: step, file, cause, where it went.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert "\n" not in line
    assert line.startswith("checkpoint 5 cannot be restored: ")
    assert f"{directory / named_file}" in line and cause in line and str(moved) in line, line
    # Orbax's tracebacks stay off the console.
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop" not in err, err[-2000:]
    # The run goes on: step 5 can be saved again, next to the moved copy.
    assert checkpoint.save(manager, _state(5, offset=2.0)) == 5
    assert _equal(checkpoint.restore_latest(manager, _state(0)), _state(5, offset=2.0))
    checkpoint.close(manager)
    assert sorted(os.listdir(directory)) == ["3", "5", "corrupt"]


def test_all_damaged_gives_none_and_keeps_both(two_checkpoints, caplog):
    directory, _ = two_checkpoints
    _truncate_data(directory / "5")
    _empty_metadata(directory / "3")
    manager = checkpoint.make_manager(str(directory.parent))
    with caplog.at_level(logging.WARNING):
        assert checkpoint.restore_latest(manager, _state(0)) is None
    checkpoint.close(manager)
    assert sorted(os.listdir(directory / "corrupt")) == ["3-unreadable", "5-unreadable"]
    assert [r.getMessage()[:31] for r in caplog.records] == [
        "checkpoint 5 cannot be restored", "checkpoint 3 cannot be restored"]


def test_other_layout_is_an_error_and_moves_nothing(two_checkpoints):
    directory, _ = two_checkpoints
    other = _State(step=jnp.zeros((), jnp.int32),
                   params={"w": jnp.zeros((20, 31), jnp.float32), "b": jnp.zeros(7)},
                   model_state={"count": jnp.zeros(2, jnp.int32),
                                "noise": jnp.zeros(600, jnp.int32)})
    manager = checkpoint.make_manager(str(directory.parent))
    with pytest.raises(ValueError, match=r"checkpoint 5 .* another layout .*\.params\['w'\]"):
        checkpoint.restore_latest(manager, other)
    checkpoint.close(manager)
    assert sorted(os.listdir(directory)) == ["3", "5"]


def test_checkpoint_without_record_restores_with_a_warning(two_checkpoints, caplog):
    directory, _ = two_checkpoints
    (directory / "5" / checkpoint.CHECKSUM_FILE).unlink()
    manager = checkpoint.make_manager(str(directory.parent))
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.restore_latest(manager, _state(0))
    checkpoint.close(manager)
    assert _equal(restored, _state(5, offset=1.0))
    assert "checkpoint 5" in caplog.text and "without verifying" in caplog.text


def test_empty_workdir_gives_none(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path))
    assert checkpoint.restore_latest(manager, _state(0)) is None
    checkpoint.close(manager)


_TWO_PROCESS_SCRIPT = r"""
import glob, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stn_jax.train import checkpoint

mesh = Mesh(np.array(jax.devices()), ("d",))
def state(step, offset):
    def put(x, spec):
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])
    return S(step=put(np.array(step, np.int32), P()),
             w=put(np.arange(16, dtype=np.float32).reshape(4, 4) + offset, P("d")),  # split
             b=put(np.full(3, offset, np.float32), P()))                             # replicated
import flax
@flax.struct.dataclass
class S:
    step: jax.Array
    w: jax.Array
    b: jax.Array
manager = checkpoint.make_manager(sys.argv[3])
checkpoint.save(manager, state(3, 0.0))
checkpoint.save(manager, state(5, 1.0))
if jax.process_index() == 0:
    data = max(glob.glob(sys.argv[3] + "/checkpoints/5/default/**/d/*", recursive=True),
               key=os.path.getsize)
    os.truncate(data, os.path.getsize(data) // 2)
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("damaged")
restored = checkpoint.restore_latest(manager, state(0, 0.0))
w = np.asarray(multihost_utils.process_allgather(restored.w, tiled=True))
print("RESULT", jax.process_index(), int(restored.step), float(w.sum()), manager.all_steps(),
      sorted(os.listdir(sys.argv[3] + "/checkpoints/corrupt")), flush=True)
checkpoint.close(manager)
"""


def test_two_processes_agree_and_process_0_moves_aside(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(port), str(i),
                               str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = sorted(line for out, _ in outs for line in out.splitlines()
                     if line.startswith("RESULT"))
    # Both restored step 3 (w = 0..15 sums to 120) after process 0 moved step 5 aside once.
    assert results == [f"RESULT {i} 3 120.0 [3] ['5-unreadable']" for i in range(2)]


def test_leftovers_of_a_failed_restore_are_dropped_and_the_rest_passes(monkeypatch):
    """Orbax's in-flight reads report "Event loop is closed" after a failed restore; those alone
    are dropped."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._drop_orbax_leftovers()
    checkpoint._drop_orbax_leftovers()  # Installed once, not stacked.
    hook = sys.unraisablehook
    assert hook.stn_jax_orbax_filter

    def report(error, obj=None):
        hook(types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                                   err_msg=None, object=obj))

    report(RuntimeError("Event loop is closed"))

    async def orbax_read():  # A coroutine whose code lives in orbax.
        pass

    orbax_read.__code__ = orbax_read.__code__.replace(
        co_filename=os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "x.py"))
    coroutine = orbax_read()
    report(RuntimeError("coroutine ignored GeneratorExit"), coroutine)
    coroutine.close()
    other = ValueError("Event loop is closed")
    report(other)
    report(RuntimeError("something else"))
    assert [str(u.exc_value) for u in seen] == ["Event loop is closed", "something else"]
    assert seen[0].exc_value is other
    asyncio_filters = [f for f in logging.getLogger("asyncio").filters
                       if isinstance(f, checkpoint._UnretrievedReadFilter)]
    assert len(asyncio_filters) == 1

    def record(message):
        return logging.LogRecord("asyncio", logging.ERROR, "x.py", 1, message, None, None)

    assert not asyncio_filters[0].filter(record(
        "Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
        "'OUT_OF_RANGE: Error reading \"params.l6/0.0\" in OCDBT database at local file')>"))
    assert asyncio_filters[0].filter(record("Future exception was never retrieved: other"))


_CONSOLE_SCRIPT = r"""
import glob, os, sys
import flax, jax, jax.numpy as jnp, numpy as np
from stn_jax.train import checkpoint

@flax.struct.dataclass
class S:
    step: jax.Array
    params: dict

rng = np.random.default_rng(0)
state = S(step=jnp.array(3, jnp.int32),
          params={f"l{i}": jnp.asarray(rng.standard_normal((30, 40)), jnp.float32)
                  for i in range(20)})
for k in range(3):
    workdir = os.path.join(sys.argv[1], str(k))
    manager = checkpoint.make_manager(workdir)
    checkpoint.save(manager, state)
    for path in glob.glob(workdir + "/checkpoints/3/default/**/d/*", recursive=True):
        if os.path.getsize(path) > 1000:  # Every data file: many reads fail and many are in flight.
            os.truncate(path, 500)
    assert checkpoint.restore_latest(manager, state) is None
    checkpoint.close(manager)
print("done", flush=True)
"""


def test_console_shows_one_line_per_damaged_checkpoint(tmp_path):
    """Without the filter this script printed ~1,300 lines of "Event loop is closed" tracebacks."""
    result = subprocess.run([sys.executable, "-c", _CONSOLE_SCRIPT, str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr[-3000:]
    for k, line in enumerate(lines):
        assert line.startswith(f"WARNING:absl:checkpoint 3 cannot be restored: {tmp_path / str(k)}")
        assert "OUT_OF_RANGE" in line

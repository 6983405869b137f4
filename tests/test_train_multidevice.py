"""Data parallelism over devices and processes, as on a pod, on this machine's CPU.

- Two processes (coordinator on localhost, 2 CPU devices each, gloo collectives) train the
  MNIST task through `python -m experiments.train --distributed`; their parameters equal a
  one-process 4-device run of the same config, and only process 0 writes files.
- Both processes killed (SIGKILL) after a checkpoint, then the same command again: the run
  resumes and ends bitwise equal to the uninterrupted two-process run.
- A batch that does not split over the devices fails before any work.

XLA's device count is fixed when jax starts, so everything runs in subprocesses. The model is
the FCN (what is checked is the sharding and the data path, the same for every model).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/mnist_r.py:model=fcn,runlocal=True"
OVERRIDES = [
    "--config.data.source=bundled", "--config.data.num_test=40",
    "--config.train.eval_batch_size=20", "--config.train.batch_size=16",
    "--config.train.lr_decay_every=3", "--config.log_every=2", "--config.eval_every=100",
    "--config.checkpoint_every=4", "--config.num_pictures=2",
]

# Runs train_and_evaluate in one process of a 2-process job and SIGKILLs itself when asked
# for the batch of step KILL_AT (after checkpoint 4 is on disk).
_KILLED_PROCESS = r"""
import os, signal, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from absl import flags
from ml_collections import config_flags
from stn_jax.data import pipeline
from stn_jax.train import train_and_evaluate

holder = config_flags.DEFINE_config_file("config", lock_config=True)
flags.FLAGS(["prog", "--config=" + sys.argv[4]] + sys.argv[5:])
original = pipeline.DistortedMNIST.train_batch

def train_batch(self, step, batch_size, **kwargs):
    if step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, step, batch_size, **kwargs)

pipeline.DistortedMNIST.train_batch = train_batch
train_and_evaluate(holder.value, sys.argv[3])
"""


def _env(devices: int, cache_dir=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env = {**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
    if cache_dir is not None:
        # The three two-process runs compile the same programs: a shared persistent cache
        # (as sweeps use, experiments/sweep_lib.py) lets the second and third load them.
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_cmd(workdir, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
            f"--workdir={workdir}", f"--config.train.num_steps={steps}", *OVERRIDES, *extra]


def _two_processes(make_cmd, cache_dir=None) -> list[subprocess.CompletedProcess]:
    """Runs make_cmd(address, process_id) for process ids 0 and 1 at once."""
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen(make_cmd(address, i), cwd=ROOT, env=_env(2, cache_dir), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def _distributed(workdir, steps):
    return lambda address, i: _train_cmd(
        workdir, steps, "--distributed", f"--coordinator_address={address}",
        "--num_processes=2", f"--process_id={i}")


def _saved(workdir, step: int) -> list[np.ndarray]:
    """The leaves of the TrainState saved at `step` (on 4 devices), read onto this one."""
    import jax

    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "default"
    checkpointer = ocp.StandardCheckpointer()
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=single),
                          checkpointer.metadata(path).item_metadata)
    return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target))]


def test_two_processes_equal_one_process_and_resume_after_kill(tmp_path):
    # Uninterrupted: two processes of 2 devices.
    two, cache = tmp_path / "two", tmp_path / "jax_cache"
    for r in _two_processes(_distributed(two, 8), cache):
        assert r.returncode == 0, r.stderr[-3000:]
    # One process of 4 devices, same config.
    one = tmp_path / "one"
    r = subprocess.run(_train_cmd(one, 8), cwd=ROOT, env=_env(4), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    m2 = json.loads((two / "metrics.json").read_text())
    m1 = json.loads((one / "metrics.json").read_text())
    assert (m2["num_devices"], m2["num_processes"]) == (4, 2)
    assert (m1["num_devices"], m1["num_processes"]) == (4, 1)
    p1, p2 = _saved(one, 8), _saved(two, 8)
    init_like = [x for x in p1 if x.ndim >= 2]
    assert init_like and len(p1) == len(p2)
    for a, b in zip(p1, p2):
        # Same data, same devices; only the all-reduce may sum in another order.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert abs(m1["test_loss"] - m2["test_loss"]) <= 1e-5 * abs(m1["test_loss"])
    assert 2.0 < m2["test_loss"] < 2.4  # 8 steps from about log(10): a real, moving loss.

    # Only process 0 wrote the files: one event file, one picture per evaluation.
    assert len(list((two / "tb").glob("events.out.tfevents*"))) == 1
    assert sorted(os.listdir(two / "pictures")) == ["step_000008.png"]
    assert sorted(os.listdir(two / "checkpoints"), key=lambda s: (len(s), s))[-1] == "8"

    # Both processes killed at step 6 (checkpoint 4 on disk), then the same command again.
    killed = tmp_path / "killed"
    for r in _two_processes(lambda address, i: [
            sys.executable, "-c", _KILLED_PROCESS, address, str(i), str(killed),
            CONFIG, "--config.train.num_steps=8", *OVERRIDES], cache):
        assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    assert "4" in os.listdir(killed / "checkpoints")
    assert not (killed / "metrics.json").exists()
    for r in _two_processes(_distributed(killed, 8), cache):
        assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == 4
    for a, b in zip(_saved(killed, 8), p2):
        np.testing.assert_array_equal(a, b)
    assert resumed["test_loss"] == m2["test_loss"]
    assert [s["last_step"] for s in resumed["segments"]] == [8]  # The killed one never ended.


def test_indivisible_batch_fails_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    r = subprocess.run(_train_cmd(workdir, 2, "--config.train.batch_size=6"), cwd=ROOT,
                       env=_env(4), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "train.batch_size=6" in r.stderr and "(4)" in r.stderr
    assert not workdir.exists()

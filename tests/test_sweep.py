"""Tests for experiments/sweep.py, experiments/sweep_lib.py and the sweeps of configs/common.py."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/ and experiments/ live at the repository root.

from configs import common  # noqa: E402
from experiments import sweep_lib  # noqa: E402
from experiments import tables_lib  # noqa: E402


# --- Sweeps as data -----------------------------------------------------------------------------


def test_product_zip_and_axis():
    grid = common.product(common.axis("model", ["fcn", "cnn"]), common.axis("config.seed", [0, 1, 2]))
    assert grid == [{"model": m, "config.seed": s} for m in ("fcn", "cnn") for s in (0, 1, 2)]
    assert common.zip_(common.axis("a", [1, 2]), common.axis("b", ["x", "y"])) == [
        {"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(ValueError, match="equal lengths"):
        common.zip_(common.axis("a", [1, 2]), common.axis("b", [1]))
    with pytest.raises(ValueError, match=r"both set \['a'\]"):
        common.product(common.axis("a", [1]), common.axis("a", [2]))


def test_mnist_sweeps_sizes_and_table1_cells():
    sweeps = common.mnist_sweeps("RTS")
    assert {name: len(trials) for name, trials in sweeps.items()} == {
        "table1": 96, "tc": 12, "column": 24, "cnn_vs_st": 6}
    trials = sweep_lib.make_trials("configs/mnist_rts.py", "table1")
    # Every (distortion, model row) cell of Table 1 gets seeds 0, 1, 2 and nothing else.
    cells = {}
    for trial in trials:
        config = sweep_lib.build_config(trial)
        fake = {"test_error_pct": 1.0, "config": config.to_dict()}
        table, row, column, _ = tables_lib.place(fake)
        assert table == "table1"
        cells.setdefault((row, column), []).append(config.seed)
    assert set(cells) == set(tables_lib.TABLES["table1"].paper)
    assert all(sorted(seeds) == [0, 1, 2] for seeds in cells.values())


@pytest.mark.parametrize("family, table", [("svhn", "table2"), ("cub", "table3")])
def test_svhn_and_cub_sweeps_fill_their_tables(family, table):
    if not (ROOT / "configs" / f"{family}.py").exists():
        pytest.skip(f"configs/{family}.py is not in this tree")
    sweeps = getattr(common, f"{family}_sweeps")()
    trials = sweep_lib.make_trials(f"configs/{family}.py", table, sweep=common.sweep(sweeps, table))
    cells = {}
    for trial in trials:
        config = sweep_lib.build_config(trial)
        placed = tables_lib.place({"test_error_pct": 1.0, "config": config.to_dict()})
        cells.setdefault(placed[:3], []).append(config.seed)
    assert sorted(cells) == sorted((table, row, column)
                                   for row, column in tables_lib.TABLES[table].paper)
    assert all(sorted(seeds) == [0, 1, 2] for seeds in cells.values())


def test_make_trials_merges_base_variants_fields_and_names():
    trials = sweep_lib.make_trials(
        "configs/mnist_rts.py:runlocal=True", "x", base_fields={"train.num_steps": 2},
        sweep=[{"config_file": "configs/mnist_e.py", "model": "st_cnn", "transform": "tps",
                "config.seed": 2, "config.train.num_steps": 5}, {"model": "cnn"}])
    first, second = trials
    assert first.name == "mnist_e,model=st_cnn,transform=tps,seed=2,train.num_steps=5"
    assert first.config_arg == "configs/mnist_e.py:runlocal=True,model=st_cnn,transform=tps"
    assert first.fields == {"train.num_steps": 5, "seed": 2}  # The trial's own value wins.
    config = sweep_lib.build_config(first)
    assert (config.data.distortion, config.model.transform, config.seed) == ("E", "tps", 2)
    assert (config.train.num_steps, config.runlocal) == (5, True)
    assert second.name == "model=cnn"
    assert second.train_args("/w") == ["--config=configs/mnist_rts.py:runlocal=True,model=cnn",
                                       "--workdir=/w/model=cnn", "--config.train.num_steps=2"]


@pytest.mark.parametrize("sweep, message", [
    ([{"modle": "cnn"}], r"trial 'modle=cnn'.*'modle' is unknown \(did you mean 'model'\?\)"),
    ([{"model": "resnet"}], r"model='resnet'.*valid values"),
    ([{"config.train.num_stepz": 3}], r"num_stepz"),
    ([{"config.train": 3}], r"'train' is not a field"),
    ([{"config.seed": "one"}], r"seed"),
    ([{"config_file": "configs/nope.py"}], r"does not exist"),
    ([{"model": "cnn"}, {"model": "cnn"}], r"share the name"),
])
def test_bad_trials_fail_before_anything_runs(sweep, message):
    with pytest.raises(ValueError, match=message):
        sweep_lib.make_trials("configs/mnist_rts.py", "s", sweep=sweep)


def test_unknown_sweep_name_fails_with_a_hint():
    with pytest.raises(ValueError, match=r"'tabel1' is unknown \(did you mean 'table1'\?\)"):
        sweep_lib.make_trials("configs/mnist_r.py", "tabel1")


# --- Launchers: the exact commands --------------------------------------------------------------

# A field value with a space, a comma and a quote must reach experiments.train unchanged.
_ODD = "/data/my mnist,v2/it's"


def _odd_trial():
    (trial,) = sweep_lib.make_trials("configs/mnist_rts.py:runlocal=True", "x", sweep=[
        {"model": "cnn", "config.seed": 1, "config.data.idx_dir": _ODD}])
    return trial


def test_tpu_vm_command_exactly():
    launcher = sweep_lib.TpuVmLauncher(tpu="pod-1", zone="us-central2-b",
                                       remote_workdir="gs://bucket/sw")
    trial = _odd_trial()
    assert trial.name == "model=cnn,seed=1,data.idx_dir=_data_my_mnist,v2_it_s"
    argv = launcher.argv(trial, "/local/sw")
    assert shlex.join(argv) == (
        "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-central2-b --worker=all "
        "'--command=python -m experiments.train --distributed "
        "--config=configs/mnist_rts.py:runlocal=True,model=cnn "
        "--workdir=gs://bucket/sw/model=cnn,seed=1,data.idx_dir=_data_my_mnist,v2_it_s "
        "--config.seed=1 '\"'\"'--config.data.idx_dir=/data/my mnist,v2/it'\"'\"'\"'\"'\"'\"'\"'\"'s'\"'\"''")
    # What each worker's shell runs: the remote command splits back into the train arguments.
    remote = argv[-1][len("--command="):]
    assert shlex.split(remote) == ["python", "-m", "experiments.train", "--distributed",
                                   *trial.train_args("gs://bucket/sw")]
    assert shlex.split(remote)[-1] == f"--config.data.idx_dir={_ODD}"


def test_slurm_script_exactly(tmp_path):
    launcher = sweep_lib.SlurmLauncher(nodes=2, partition="gpu", time_limit="12:00:00",
                                       gpus_per_node=8, sbatch_lines=["--account=stn"],
                                       cwd="/home/me/stn jax")
    trial = _odd_trial()
    workdir = str(tmp_path)
    trial_dir = f"{workdir}/model=cnn,seed=1,data.idx_dir=_data_my_mnist,v2_it_s"
    assert launcher.script(trial, workdir) == textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --job-name=stn-model=cnn,seed=1,data.idx_dir=_data_my_mnist,v2_it_s
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --output={trial_dir}/slurm-%j.out
        #SBATCH --partition=gpu
        #SBATCH --time=12:00:00
        #SBATCH --gpus-per-node=8
        #SBATCH --account=stn
        set -euo pipefail
        cd '/home/me/stn jax'
        srun python -m experiments.train --distributed --config=configs/mnist_rts.py:runlocal=True,model=cnn --workdir={trial_dir} --config.seed=1 '--config.data.idx_dir=/data/my mnist,v2/it'"'"'s'
        """)
    srun = launcher.script(trial, workdir).splitlines()[-1]
    assert shlex.split(srun)[-1] == f"--config.data.idx_dir={_ODD}"
    assert launcher.argv(trial, workdir) == ["sbatch", "--parsable", f"{trial_dir}/job.sbatch"]


def test_dry_run_prints_commands_and_runs_nothing(tmp_path):
    trials = sweep_lib.make_trials("configs/mnist_rts.py", "cnn_vs_st")
    lines = []
    launcher = sweep_lib.TpuVmLauncher(tpu="t", zone="z")
    summary = sweep_lib.run_sweep(trials, launcher, workdir=str(tmp_path), dry_run=True,
                                  print_fn=lines.append)
    assert lines[1:] == [shlex.join(launcher.argv(t, str(tmp_path))) for t in trials]
    assert len(lines) == 7 and all("--worker=all" in line for line in lines[1:])
    assert summary.done == [] and os.listdir(tmp_path) == []


# --- The runner, with a stand-in for experiments.train ------------------------------------------

# Follows experiments.train's contract: resumes from <workdir>/ckpt, exits 75 without metrics.json
# when SIGTERM stops it, writes metrics.json when done. `--config.train.num_steps=-1` fails;
# `--config.train.num_steps=0` waits for SIGTERM, `-2` exits 75 at once, `-3` exits 75 after
# writing metrics.json. Every start is appended to <workdir>/starts.
_FAKE_TRAIN = r"""
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir, steps = args["workdir"], int(args.get("config.train.num_steps", "1"))
seed = int(args.get("config.seed", "0"))
open(os.path.join(workdir, "starts"), "a").write("start\n")
ckpt = os.path.join(workdir, "ckpt")
resumed = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
if steps == -2:
    sys.exit(75)  # Preempted from outside: a checkpoint was saved.
if steps == -1:
    raise ValueError("boom in " + workdir)
if steps == 0 and not resumed:
    signal.signal(signal.SIGTERM, lambda *_: (open(ckpt, "w").write("7"), sys.exit(75)))
    open(os.path.join(workdir, "waiting"), "w").close()
    time.sleep(60)
    sys.exit(3)
json.dump({"test_error_pct": 10.0 + seed, "steps": 7, "resumed_from_step": resumed,
           "config": {"seed": seed}}, open(os.path.join(workdir, "metrics.json"), "w"))
if steps == -3:
    sys.exit(75)  # A stop that came after the results were written.
"""


class FakeLauncher(sweep_lib.LocalLauncher):
    def argv(self, trial, workdir):
        return [sys.executable, "-c", _FAKE_TRAIN, *trial.train_args(workdir)[1:]]


class _Fails75Launcher(sweep_lib.LocalLauncher):
    def argv(self, trial, workdir):
        return [sys.executable, "-c", "import sys; print('stopped'); sys.exit(75)"]


def _trials(*steps):
    return sweep_lib.make_trials("configs/mnist_r.py", "x", sweep=[
        {"config.seed": i, "config.train.num_steps": s} for i, s in enumerate(steps)])


def _starts(workdir, trial):
    path = os.path.join(workdir, trial.name, "starts")
    return len(open(path).read().split()) if os.path.exists(path) else 0


def test_failing_trial_is_recorded_and_the_others_go_on(tmp_path):
    workdir = str(tmp_path)
    trials = _trials(1, -1, 1)
    lines = []
    summary = sweep_lib.run_sweep(trials, FakeLauncher(), workdir=workdir, parallel=2,
                                  print_fn=lines.append)
    assert sorted(summary.done) == [trials[0].name, trials[2].name]
    assert summary.failed == [trials[1].name]
    states = sweep_lib.read_manifest(workdir)
    assert {name: entry["state"] for name, entry in states.items()} == {
        trials[0].name: "done", trials[1].name: "failed", trials[2].name: "done"}
    assert states[trials[1].name]["error"] == (
        f"exit code 1: ValueError: boom in {workdir}/{trials[1].name}")
    assert states[trials[2].name]["result"] == {"test_error_pct": 12.0, "steps": 7,
                                                "resumed_from_step": 0}
    assert lines[-1].startswith("[2/3 done, 1 failed, 0 running] finished in ")
    # Rerun: the finished trials are skipped; the failed one runs again (and fails again).
    summary = sweep_lib.run_sweep(trials, FakeLauncher(), workdir=workdir, print_fn=lines.append)
    assert (summary.skipped, summary.failed) == ([trials[0].name, trials[2].name], [trials[1].name])
    assert [_starts(workdir, t) for t in trials] == [1, 2, 1]
    summary = sweep_lib.run_sweep(trials, FakeLauncher(), workdir=workdir, rerun_failed=False,
                                  print_fn=lines.append)
    assert len(summary.skipped) == 3 and [_starts(workdir, t) for t in trials] == [1, 2, 1]
    # An attempt's error is its own, not an earlier attempt's still in the log.
    sweep_lib.run_sweep(sweep_lib.make_trials("configs/mnist_r.py", "x", sweep=[
        {"config.seed": 1, "config.train.num_steps": -1}]), _Fails75Launcher(), workdir=workdir,
        print_fn=lambda line: None)
    entry = sweep_lib.read_manifest(workdir)[trials[1].name]
    assert (entry["state"], entry["error"]) == ("interrupted", "exit code 75: stopped")


def test_stop_interrupts_and_rerun_resumes_from_the_checkpoint(tmp_path):
    workdir = str(tmp_path)
    trials = _trials(1, 0, 1)  # The second one runs until stopped.
    stop = threading.Event()

    def stop_when_waiting():
        waiting = os.path.join(workdir, trials[1].name, "waiting")
        while not os.path.exists(waiting):
            time.sleep(0.02)
        stop.set()

    threading.Thread(target=stop_when_waiting, daemon=True).start()
    summary = sweep_lib.run_sweep(trials, FakeLauncher(), workdir=workdir, stop=stop,
                                  print_fn=lambda line: None)
    assert summary.done == [trials[0].name]
    assert summary.interrupted == [trials[1].name, trials[2].name]  # The third never started.
    assert sweep_lib.read_manifest(workdir)[trials[1].name]["state"] == "interrupted"
    summary = sweep_lib.run_sweep(trials, FakeLauncher(), workdir=workdir,
                                  print_fn=lambda line: None)
    assert summary.skipped == [trials[0].name]
    assert summary.done == [trials[1].name, trials[2].name]
    assert [_starts(workdir, t) for t in trials] == [1, 2, 1]
    result = sweep_lib.read_manifest(workdir)[trials[1].name]["result"]
    assert result["resumed_from_step"] == 7  # The same command picked up its checkpoint.


def test_exit_75_is_an_interruption_not_a_failure_and_results_make_it_done(tmp_path):
    trials = _trials(-2, -3)
    summary = sweep_lib.run_sweep(trials, FakeLauncher(), workdir=str(tmp_path),
                                  print_fn=lambda line: None)
    assert (summary.interrupted, summary.failed, summary.done) == (
        [trials[0].name], [], [trials[1].name])
    states = sweep_lib.read_manifest(str(tmp_path))
    assert [states[t.name]["state"] for t in trials] == ["interrupted", "done"]


def test_a_trial_another_runner_holds_is_left_to_it(tmp_path):
    import fcntl

    workdir = str(tmp_path)
    trials = _trials(1, 1)
    os.makedirs(os.path.join(workdir, trials[0].name))
    with open(os.path.join(workdir, trials[0].name, "sweep.lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # As a running runner holds it.
        summary = sweep_lib.run_sweep(trials, FakeLauncher(), workdir=workdir,
                                      print_fn=lambda line: None)
    assert (summary.busy, summary.done) == ([trials[0].name], [trials[1].name])
    assert [_starts(workdir, t) for t in trials] == [0, 1]


def test_a_trial_finished_elsewhere_is_recorded_done(tmp_path):
    workdir = str(tmp_path)
    trials = _trials(1)
    sweep_lib.run_sweep(trials, FakeLauncher(), workdir=workdir, print_fn=lambda line: None)
    os.remove(os.path.join(workdir, sweep_lib.MANIFEST))  # As if another runner had run it.
    summary = sweep_lib.run_sweep(trials, FakeLauncher(), workdir=workdir,
                                  print_fn=lambda line: None)
    assert summary.skipped == [trials[0].name] and _starts(workdir, trials[0]) == 1
    entry = sweep_lib.read_manifest(workdir)[trials[0].name]
    assert (entry["state"], entry["result"]["test_error_pct"]) == ("done", 10.0)


def test_a_torn_manifest_line_and_a_stale_running_state_are_survived(tmp_path):
    workdir = str(tmp_path)
    trials = _trials(1, 1)
    manifest = sweep_lib.Manifest(workdir)
    manifest.record(trials[0], "running")  # The runner was killed with its trial running.
    with open(manifest.path, "a") as f:
        f.write('{"trial": "torn')
    summary = sweep_lib.run_sweep(trials, FakeLauncher(), workdir=workdir,
                                  print_fn=lambda line: None)
    assert summary.done == [t.name for t in trials]


# --- End to end: experiments.sweep, killed and resumed, then experiments.tables -----------------


def _sweep_config(tmp_path):
    """A config file whose sweep `four` is FCN on R, RTS, P and E (one cell of Table 1 each)."""
    path = tmp_path / "four.py"
    files = [str(ROOT / "configs" / f"mnist_{d}.py") for d in ("r", "rts", "p", "e")]
    path.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from configs import common

        def get_config(arg=None):
            return common.mnist_config("R", arg)

        def get_sweep(name):
            four = common.product(common.axis("config_file", {files!r}), [{{"model": "fcn"}}])
            return common.sweep({{"four": four}}, name)
        """))
    return str(path)


_TINY = ["--config.train.num_steps=2", "--config.data.num_train=64", "--config.data.num_test=64",
         "--config.train.eval_batch_size=64", "--config.train.batch_size=8",
         "--config.data.source=bundled", "--config.log_every=1"]


def test_sweep_end_to_end_killed_resumed_and_tabled(tmp_path):
    workdir = str(tmp_path / "sweep")
    command = [sys.executable, "-m", "experiments.sweep", f"--config={_sweep_config(tmp_path)}",
               "--sweep=four", f"--workdir={workdir}", "--parallel=2", *_TINY,
               f"--jax_cache_dir={tmp_path / 'jax_cache'}"]  # Halves a trial's CPU time here.
    runner = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and runner.poll() is None:
        states = sweep_lib.read_manifest(workdir) if os.path.isdir(workdir) else {}
        if any(entry["state"] == "done" for entry in states.values()):
            break
        time.sleep(0.2)
    runner.send_signal(signal.SIGTERM)
    first, _ = runner.communicate(timeout=120)
    states = sweep_lib.read_manifest(workdir)
    done_first = {name for name, entry in states.items() if entry["state"] == "done"}
    assert done_first and len(done_first) < 4, first
    assert runner.returncode == 1, first  # Trials left: interrupted (or never started).

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{len(done_first)} done or skipped before, {4 - len(done_first)} to run" in resumed.stdout
    assert "[4/4 done, 0 failed, 0 running] finished" in resumed.stdout
    states = sweep_lib.read_manifest(workdir)
    assert {entry["state"] for entry in states.values()} == {"done"}
    with open(os.path.join(workdir, sweep_lib.MANIFEST)) as f:
        started = [json.loads(line)["trial"] for line in f if '"running"' in line]
    assert all(started.count(name) == 1 for name in done_first)  # Finished ones not rerun.

    tables = subprocess.run([sys.executable, "-m", "experiments.tables", f"--workdir={workdir}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert tables.returncode == 0, tables.stderr
    fcn_row = next(line for line in tables.stdout.splitlines() if line.startswith("| FCN |"))
    expected = []
    for distortion, paper in zip(("r", "rts", "p", "e"), (2.1, 5.2, 3.1, 3.2)):
        with open(os.path.join(workdir, f"mnist_{distortion},model=fcn", "metrics.json")) as f:
            metrics = json.load(f)
        assert metrics["steps"] == 2 and metrics["data_source"] == "bundled"
        expected.append(f"{metrics['test_error_pct']:.2f} (n=1) ‡ / {paper}")
    assert fcn_row == "| FCN | " + " | ".join(expected) + " |"
    assert os.path.getsize(os.path.join(workdir, "tables.png")) > 1000
    assert os.listdir(tmp_path / "jax_cache")  # The trials wrote to the shared cache.


@pytest.mark.parametrize("module", [sweep_lib, common], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    import doctest

    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0

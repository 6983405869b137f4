r"""Sweeps: trials from a config file's named sweep, their commands, and a resumable runner.

A config file names its sweeps (`get_sweep(name)` -> a list of override dicts, see
`configs/common.py`); `experiments/sweep.py` turns one into trials and runs them:

    trials = make_trials("configs/mnist_rts.py:runlocal=True", "cnn_vs_st", workdir="/tmp/sw")
    run_sweep(trials, LocalLauncher(), workdir="/tmp/sw", parallel=2)

An override key is `config_file` (another config file), a variant (the text after the colon,
e.g. `model`) or `config.<field>` (a field, as `--config.<field>=` sets it). Every trial's config
is built before anything runs, so an unknown key or value fails at once, naming the trial.

Each trial has its own workdir, `<workdir>/<name>`, named by its overrides (e.g.
`mnist_rts,model=cnn,seed=0`), which is the training run's workdir: rerunning the same command
there resumes from its newest checkpoint. `<workdir>/manifest.jsonl` records, one JSON object a
line and only ever appended, each trial's state as it changes (pending, running, done, failed,
interrupted, submitted) with its command, result or error; the last line of a trial is its state.
A trial whose `metrics.json` exists is done and is skipped by the next run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable

CONFIG_FILE_KEY = "config_file"
FIELD_PREFIX = "config."
MANIFEST = "manifest.jsonl"
INTERRUPTED_EXIT = 75  # experiments.train's status after SIGTERM or Ctrl-C saved a checkpoint.
LOG = "sweep_log.txt"  # The trial's stdout and stderr, in its workdir.
RESULT_KEYS = ("test_error_pct", "test_accuracy", "steps", "wall_time_s", "num_params",
               "data_source", "resumed_from_step")
_MAX_NAME = 150  # Longer trial names are cut and given a hash: file systems cap a name at 255.


@dataclasses.dataclass(frozen=True)
class Trial:
    """One training run of a sweep.

    Attributes:
        name: its directory name under the sweep's workdir, from its overrides.
        config_file: the config file's path, as the command passes it.
        variants: the text after the colon, e.g. "runlocal=True,model=cnn" ("" for none).
        fields: {dotted field: value} passed as `--config.<field>=<value>`.
        overrides: the sweep's dict this trial came from (for the manifest).
    """

    name: str
    config_file: str
    variants: str
    fields: dict[str, Any]
    overrides: dict[str, Any]

    @property
    def config_arg(self) -> str:
        """The `--config=` value: 'configs/mnist_rts.py:model=cnn'."""
        return f"{self.config_file}:{self.variants}" if self.variants else self.config_file

    def train_args(self, workdir: str) -> list[str]:
        """The flags of `experiments.train` for this trial, its workdir under `workdir`."""
        return ([f"--config={self.config_arg}", f"--workdir={trial_workdir(workdir, self)}"]
                + [f"--config.{key}={format_value(value)}" for key, value in self.fields.items()])


def trial_workdir(workdir: str, trial: Trial) -> str:
    return f"{workdir.rstrip('/')}/{trial.name}"


def format_value(value: Any) -> str:
    """A field value as `--config.x=` reads it back: str as is, anything else by repr.

    Example:
        >>> [format_value(v) for v in (True, 2, 0.01, "a b,c", (1, 2))]
        ['True', '2', '0.01', 'a b,c', '(1, 2)']
    """
    return value if isinstance(value, str) else repr(value)


def split_config_arg(config_arg: str) -> tuple[str, dict[str, str]]:
    """'configs/x.py:a=1,b=2' -> ('configs/x.py', {'a': '1', 'b': '2'}); order kept.

    The variants are checked by the config file itself when the trial's config is built.
    """
    path, _, arg = config_arg.partition(":")
    variants = {}
    for item in filter(str.strip, arg.split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"config variant {item!r} in {config_arg!r}: expected key=value")
        variants[key] = value
    return path, variants


def trial_name(overrides: dict[str, Any]) -> str:
    """A directory name from a trial's overrides, in their order; safe on any file system.

    `config_file` gives its file name without .py, a field its path without `config.`.

    Example:
        >>> trial_name({"config_file": "configs/mnist_rts.py", "model": "cnn", "config.seed": 0})
        'mnist_rts,model=cnn,seed=0'
    """
    parts = []
    for key, value in overrides.items():
        if key == CONFIG_FILE_KEY:
            parts.append(os.path.splitext(os.path.basename(str(value)))[0])
        else:
            key = key[len(FIELD_PREFIX):] if key.startswith(FIELD_PREFIX) else key
            parts.append(f"{key}={format_value(value)}")
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "base"
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:_MAX_NAME - 11]}-{digest}"
    return name


_MODULES: dict[str, Any] = {}


def load_config_module(path: str):
    """The config file at `path` as a module (cached); ValueError if it does not exist."""
    path = os.path.abspath(path)
    if path not in _MODULES:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        spec = importlib.util.spec_from_file_location(
            "_sweep_config_" + hashlib.sha1(path.encode()).hexdigest()[:8], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return _MODULES[path]


def build_config(trial: Trial):
    """The trial's locked config, as `experiments.train` will build it.

    Raises:
        ValueError: an unknown variant, field or value, naming the trial.
    """
    try:
        config = load_config_module(trial.config_file).get_config(trial.variants or None)
        for key, value in trial.fields.items():
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = getattr(node, parent)
            if not hasattr(node, leaf) or hasattr(getattr(node, leaf), "keys"):
                raise AttributeError(f"{key!r} is not a field of the config")
            setattr(node, leaf, value)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"trial {trial.name!r}: {error}") from error
    return config


def make_trials(config_arg: str, sweep_name: str, *, base_fields: dict[str, Any] | None = None,
                sweep: list[dict] | None = None) -> list[Trial]:
    """The trials of a config file's named sweep, every config built and checked.

    Args:
        config_arg: the runner's --config, e.g. "configs/mnist_rts.py:runlocal=True": the
            config file of trials without `config_file`, and variants every trial starts from.
        sweep_name: the name passed to the config file's `get_sweep`.
        base_fields: {dotted field: value} for every trial (the runner's `--config.x=` flags);
            a trial's own `config.x` wins.
        sweep: the override dicts, instead of asking the config file (for tests and scripts).

    Returns:
        The trials in the sweep's order.

    Raises:
        ValueError: no `get_sweep` in the file, an unknown sweep, an override that is not
            a dict, an unknown key or value (the trial named), or two trials with one name.
    """
    base_file, base_variants = split_config_arg(config_arg)
    if sweep is None:
        module = load_config_module(base_file)
        if not hasattr(module, "get_sweep"):
            raise ValueError(f"config file {base_file!r} defines no get_sweep(name)")
        sweep = module.get_sweep(sweep_name)
    trials, seen = [], {}
    for overrides in sweep:
        if not isinstance(overrides, dict):
            raise ValueError(f"sweep {sweep_name!r}: a trial must be a dict, got {overrides!r}")
        config_file = str(overrides.get(CONFIG_FILE_KEY, base_file))
        variants, fields = dict(base_variants), dict(base_fields or {})
        for key, value in overrides.items():
            if key == CONFIG_FILE_KEY:
                continue
            if key.startswith(FIELD_PREFIX):
                fields[key[len(FIELD_PREFIX):]] = value
            else:
                variants[key] = format_value(value)
        trial = Trial(name=trial_name(overrides), config_file=config_file,
                      variants=",".join(f"{k}={v}" for k, v in variants.items()),
                      fields=fields, overrides=dict(overrides))
        if trial.name in seen:
            raise ValueError(f"sweep {sweep_name!r}: trials {seen[trial.name]} and {overrides} "
                             f"share the name {trial.name!r}")
        seen[trial.name] = overrides
        build_config(trial)
        trials.append(trial)
    return trials


# --- Launchers: what runs a trial ---------------------------------------------------------------


class LocalLauncher:
    """Runs `python -m experiments.train --config=... --workdir=...` here, one subprocess a trial."""

    kind = "local"
    reads_metrics = True  # The trial's metrics.json is on this machine.

    def __init__(self, *, python: str = sys.executable, jax_cache_dir: str = ""):
        """`jax_cache_dir`: a persistent compilation cache the trials share (seeds of one model
        compile the same programs; a cache hit skips the compile)."""
        self.python = python
        self.env = ({"JAX_COMPILATION_CACHE_DIR": jax_cache_dir,
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"} if jax_cache_dir else {})

    def argv(self, trial: Trial, workdir: str) -> list[str]:
        return [self.python, "-m", "experiments.train", *trial.train_args(workdir)]

    def display(self, trial: Trial, workdir: str) -> str:
        return shlex.join(self.argv(trial, workdir))


class TpuVmLauncher(LocalLauncher):
    """One `gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...` a trial.

    Every worker of the pod runs the same `python -m experiments.train --distributed ...`
    (`jax.distributed.initialize()` finds the pod by itself). The trial's workdir is under
    `remote_workdir` (e.g. a gs:// bucket every worker reaches); the manifest stays here.
    """

    kind = "tpu_vm"
    reads_metrics = False

    def __init__(self, *, tpu: str, zone: str, project: str = "", remote_workdir: str = "",
                 python: str = "python", remote_cd: str = ""):
        if not tpu or not zone:
            raise ValueError(f"tpu and zone are needed for tpu_vm, got tpu={tpu!r} zone={zone!r}")
        super().__init__(python=python)  # No env: the workers have their own.
        self.tpu, self.zone, self.project = tpu, zone, project
        self.remote_workdir, self.remote_cd = remote_workdir, remote_cd

    def remote_command(self, trial: Trial, workdir: str) -> str:
        """The shell command every worker runs (quoted for a shell by shlex)."""
        command = shlex.join([self.python, "-m", "experiments.train", "--distributed",
                              *trial.train_args(self.remote_workdir or workdir)])
        return f"cd {shlex.quote(self.remote_cd)} && {command}" if self.remote_cd else command

    def argv(self, trial: Trial, workdir: str) -> list[str]:
        project = [f"--project={self.project}"] if self.project else []
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.tpu, f"--zone={self.zone}",
                *project, "--worker=all", f"--command={self.remote_command(trial, workdir)}"]


class SlurmLauncher(LocalLauncher):
    """Writes `<workdir>/<trial>/job.sbatch` (srun over the nodes) and submits it with sbatch.

    Each node runs one `python -m experiments.train --distributed ...` (jax finds the Slurm job
    by itself); the trial's workdir must be on a file system every node shares.
    """

    kind = "slurm"
    reads_metrics = True

    def __init__(self, *, nodes: int = 1, partition: str = "", time_limit: str = "",
                 gpus_per_node: int = 0, sbatch_lines: Iterable[str] = (), python: str = "python",
                 cwd: str | None = None):
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        super().__init__(python=python)
        self.nodes, self.partition, self.time_limit = nodes, partition, time_limit
        self.gpus_per_node, self.sbatch_lines = gpus_per_node, list(sbatch_lines)
        self.cwd = cwd or os.getcwd()

    def script_path(self, trial: Trial, workdir: str) -> str:
        return os.path.join(trial_workdir(workdir, trial), "job.sbatch")

    def script(self, trial: Trial, workdir: str) -> str:
        """The sbatch script's text."""
        trial_dir = trial_workdir(workdir, trial)
        lines = ["#!/bin/bash",
                 f"#SBATCH --job-name={shlex.quote('stn-' + trial.name)}",
                 f"#SBATCH --nodes={self.nodes}",
                 "#SBATCH --ntasks-per-node=1",
                 f"#SBATCH --output={shlex.quote(os.path.join(trial_dir, 'slurm-%j.out'))}"]
        if self.partition:
            lines.append(f"#SBATCH --partition={self.partition}")
        if self.time_limit:
            lines.append(f"#SBATCH --time={self.time_limit}")
        if self.gpus_per_node:
            lines.append(f"#SBATCH --gpus-per-node={self.gpus_per_node}")
        lines += [f"#SBATCH {line}" for line in self.sbatch_lines]
        lines += ["set -euo pipefail", f"cd {shlex.quote(self.cwd)}",
                  "srun " + shlex.join([self.python, "-m", "experiments.train", "--distributed",
                                        *trial.train_args(workdir)])]
        return "\n".join(lines) + "\n"

    def write_script(self, trial: Trial, workdir: str) -> str:
        path = self.script_path(trial, workdir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(self.script(trial, workdir))
        return path

    def argv(self, trial: Trial, workdir: str) -> list[str]:
        return ["sbatch", "--parsable", self.script_path(trial, workdir)]


# --- The manifest -------------------------------------------------------------------------------


def read_manifest(workdir: str) -> dict[str, dict]:
    """{trial name: its newest manifest line}; a torn last line (a killed writer) is skipped."""
    states = {}
    path = os.path.join(workdir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                states[entry["trial"]] = entry
    return states


class Manifest:
    """Appends one JSON line per state change (thread-safe); the last line of a trial wins."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, MANIFEST)
        self._lock = threading.Lock()

    def record(self, trial: Trial, state: str, **extra) -> dict:
        entry = {"trial": trial.name, "state": state, "time": time.time(),
                 "overrides": trial.overrides, **extra}
        with self._lock, open(self.path, "a") as f:
            f.write(json.dumps(entry, default=repr) + "\n")
        return entry


def read_result(trial_dir: str) -> dict | None:
    """The summary of `<trial_dir>/metrics.json`, or None if there is none (yet) or it is cut
    short (being written)."""
    path = os.path.join(trial_dir, "metrics.json")
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return {key: metrics[key] for key in RESULT_KEYS if key in metrics}


def _last_error_line(log_path: str, offset: int = 0) -> str:
    """The exception line of the log after `offset` (where this attempt began), else its last."""
    try:
        with open(log_path, errors="replace") as f:
            f.seek(offset)
            lines = [line.strip() for line in f.read().splitlines()[-200:] if line.strip()]
    except OSError:
        return ""
    # The exception's own line, not the logging that follows it.
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line):
            return line
    return lines[-1] if lines else ""


# --- The runner ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    """What a run of the sweep did: trial names by final state of this run."""

    done: list[str]
    failed: list[str]
    skipped: list[str]  # Finished (or submitted) before this run.
    interrupted: list[str]
    submitted: list[str]
    busy: list[str] = dataclasses.field(default_factory=list)  # Another runner had them.


class _TrialLock:
    """An exclusive flock on <trial_dir>/sweep.lock while a runner runs the trial, so that two
    runners on one sweep never run one trial twice at once; the kernel drops it when the runner
    dies, however it dies. `with _TrialLock(d) as owned:` (owned False: another runner has it)."""

    def __init__(self, trial_dir: str):
        self.path = os.path.join(trial_dir, "sweep.lock")
        self.file = None

    def __enter__(self) -> bool:
        import fcntl  # POSIX only, like the runner's signals.

        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            self.file = None
            return False
        return True

    def __exit__(self, *exc_info) -> None:
        if self.file is not None:
            self.file.close()  # Closing releases the lock.


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def run_sweep(trials: list[Trial], launcher, *, workdir: str, parallel: int = 1,
              dry_run: bool = False, rerun_failed: bool = True, resubmit: bool = False,
              print_fn: Callable[[str], None] = print,
              stop: threading.Event | None = None) -> Summary:
    """Runs the trials not yet done, `parallel` at a time, recording each in the manifest.

    Args:
        trials: from `make_trials`.
        launcher: LocalLauncher, TpuVmLauncher or SlurmLauncher (anything with `kind`,
            `reads_metrics`, `argv(trial, workdir)`).
        workdir: the sweep's folder: the manifest, and one workdir per trial.
        parallel: trials run side by side (>= 1).
        dry_run: print the commands of the trials to run and run nothing (the slurm launcher
            still writes its scripts, which are what it would submit).
        rerun_failed: run trials that failed last time again (False: skip them).
        resubmit: slurm: submit trials already submitted and not finished again.
        print_fn: where progress lines go.
        stop: set it (e.g. from a signal handler) to stop: no new trial starts and running ones
            get SIGTERM, which makes `experiments.train` save a checkpoint and exit.

    Returns:
        A Summary. A failed trial is recorded with its error and the others go on.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    stop = stop or threading.Event()
    previous = read_manifest(workdir)
    to_run, skipped = [], []
    for trial in trials:
        last = previous.get(trial.name, {})
        # Done is a metrics.json where this machine can read it, else the manifest's word.
        if launcher.reads_metrics:
            finished = read_result(trial_workdir(workdir, trial)) is not None
        else:
            finished = last.get("state") == "done"
        if finished:
            skipped.append(trial.name)
        elif last.get("state") == "submitted" and not resubmit:
            skipped.append(trial.name)
        elif last.get("state") == "failed" and not rerun_failed:
            skipped.append(trial.name)
        else:
            to_run.append(trial)
    total = len(trials)
    print_fn(f"sweep: {total} trials, {len(skipped)} done or skipped before, {len(to_run)} to run "
             f"({launcher.kind}{', dry run' if dry_run else ''}); manifest "
             f"{os.path.join(workdir, MANIFEST)}")
    summary = Summary(done=[], failed=[], skipped=skipped, interrupted=[], submitted=[])
    if dry_run:
        for trial in to_run:
            if isinstance(launcher, SlurmLauncher):
                launcher.write_script(trial, workdir)
            print_fn(shlex.join(launcher.argv(trial, workdir)))
        return summary

    manifest = Manifest(workdir)
    for trial in trials:  # Finished outside this runner (or its record was lost): say so.
        if trial.name in skipped and previous.get(trial.name, {}).get("state") != "done" and (
                result := launcher.reads_metrics and read_result(trial_workdir(workdir, trial))):
            manifest.record(trial, "done", result=result)
    for trial in to_run:
        if trial.name not in previous:
            manifest.record(trial, "pending", command=launcher.argv(trial, workdir))
    lock = threading.Lock()
    running: dict[str, subprocess.Popen] = {}
    durations: list[float] = []
    queue = list(to_run)
    start = time.monotonic()

    def progress(message: str) -> None:
        finished = len(skipped) + len(summary.done) + len(summary.submitted)
        remaining = len(queue) + len(running)
        eta = ""
        if durations and remaining:
            mean = sum(durations) / len(durations)
            eta = f", ETA {_format_duration(mean * remaining / min(parallel, remaining))}"
        print_fn(f"[{finished}/{total} done, {len(summary.failed)} failed, {len(running)} running"
                 f"{eta}] {message}")

    def run_one(trial: Trial) -> None:
        trial_dir = trial_workdir(workdir, trial)
        os.makedirs(trial_dir, exist_ok=True)
        with _TrialLock(trial_dir) as owned:
            if not owned:
                with lock:
                    summary.busy.append(trial.name)
                    progress(f"skipped {trial.name}: another runner is running it")
                return
            run_locked(trial, trial_dir)

    def run_locked(trial: Trial, trial_dir: str) -> None:
        if isinstance(launcher, SlurmLauncher):
            launcher.write_script(trial, workdir)
        argv = launcher.argv(trial, workdir)
        log_path = os.path.join(trial_dir, LOG)
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0  # Earlier attempts.
        began = time.monotonic()
        with lock:
            if stop.is_set():
                return
            manifest.record(trial, "running", command=argv, log=log_path)
            try:
                with open(log_path, "ab") as log:
                    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True,
                                               env={**os.environ, **getattr(launcher, "env", {})})
            except OSError as error:
                process = None
                failure = f"{type(error).__name__}: {error}"
            else:
                running[trial.name] = process
            progress(f"started {trial.name}")
        returncode = process.wait() if process is not None else None
        seconds = time.monotonic() - began
        with lock:
            running.pop(trial.name, None)
            result = read_result(trial_dir) if launcher.reads_metrics else None
            if process is None:
                summary.failed.append(trial.name)
                manifest.record(trial, "failed", error=failure, log=log_path)
                progress(f"FAILED {trial.name}: {failure}")
            elif returncode != 0 and result is None:  # metrics.json is written last: done.
                error = f"exit code {returncode}: {_last_error_line(log_path, offset)}"
                if stop.is_set() or returncode == INTERRUPTED_EXIT:
                    summary.interrupted.append(trial.name)
                    manifest.record(trial, "interrupted", error=error, log=log_path)
                    progress(f"interrupted {trial.name} ({error})")
                else:
                    summary.failed.append(trial.name)
                    manifest.record(trial, "failed", error=error, log=log_path,
                                    duration_s=seconds)
                    progress(f"FAILED {trial.name}: {error} (log: {log_path})")
            elif launcher.kind == "slurm":
                with open(log_path, errors="replace") as f:
                    job = f.read().strip().splitlines()[-1:] or [""]
                summary.submitted.append(trial.name)
                manifest.record(trial, "submitted", job_id=job[0].split(";")[0], log=log_path)
                progress(f"submitted {trial.name} as job {job[0]}")
            elif result is None and launcher.reads_metrics:
                # An older experiments.train exited 0 without metrics.json after SIGTERM.
                summary.interrupted.append(trial.name)
                manifest.record(trial, "interrupted", log=log_path, duration_s=seconds)
                progress(f"interrupted {trial.name} (checkpoint saved; rerun resumes it)")
            else:
                durations.append(seconds)
                summary.done.append(trial.name)
                manifest.record(trial, "done", result=result, log=log_path, duration_s=seconds)
                shown = (f"test_error_pct={result['test_error_pct']:.2f}"
                         if result and "test_error_pct" in result else "no metrics.json here")
                progress(f"done {trial.name}: {shown} ({_format_duration(seconds)})")

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                trial = queue.pop(0)
            run_one(trial)

    def forward_stop() -> None:
        stop.wait()
        with lock:
            for process in running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)

    threading.Thread(target=forward_stop, daemon=True).start()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # A timed join lets the main thread run signal handlers.
            thread.join(timeout=0.5)
    if stop.is_set():
        for trial in queue:
            summary.interrupted.append(trial.name)
    progress(f"finished in {_format_duration(time.monotonic() - start)}: "
             f"{len(summary.done)} done, {len(summary.failed)} failed, "
             f"{len(summary.interrupted)} interrupted, {len(summary.submitted)} submitted, "
             f"{len(skipped)} skipped" + (f", {len(summary.busy)} run by another runner"
                                          if summary.busy else "") + (f"; failed: {', '.join(summary.failed)}"
                                           if summary.failed else ""))
    return summary

r"""Runs a config file's named sweep: one training run per trial, resumable, here or on a cluster.

  python -m experiments.sweep --config=configs/mnist_rts.py --sweep=table1 --workdir=DIR
  python -m experiments.sweep --config=configs/mnist_rts.py:runlocal=True --sweep=cnn_vs_st \
      --workdir=DIR --parallel=2
  python -m experiments.sweep --config=configs/mnist_rts.py --sweep=table1 --workdir=DIR \
      --launcher=tpu_vm --tpu=NAME --zone=ZONE --dry_run
  python -m experiments.sweep --config=configs/mnist_rts.py --sweep=table1 --workdir=DIR \
      --launcher=slurm --slurm_nodes=2 --slurm_gpus_per_node=8

Variants after the colon and `--config.<field>=` flags apply to every trial (a trial's own
override wins). Every trial's config is built first: an unknown sweep, variant or field fails
before anything runs. Each trial trains in `DIR/<its overrides>`; `DIR/manifest.jsonl` records
states and results. Running the same command again skips finished trials and resumes the others
from their checkpoints; SIGTERM or Ctrl-C stops the runner, its running trials saving a
checkpoint first. Then: `python -m experiments.tables --workdir=DIR`. Run from the repository
root (the config paths of the sweeps are relative to it). Library: `experiments/sweep_lib.py`.
"""

from __future__ import annotations

import signal
import sys
import threading

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import sweep_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file whose get_sweep names the sweep, e.g. configs/mnist_rts.py; "
    "variants after the colon and --config.x= flags apply to every trial.", lock_config=True)
_SWEEP = flags.DEFINE_string("sweep", None, "Name of the sweep in the config file, e.g. table1.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's folder: manifest + a workdir a trial.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "tpu_vm", "slurm"],
                              "local: subprocesses here; tpu_vm: gcloud ssh to every worker of "
                              "a TPU VM; slurm: an sbatch script per trial.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials run side by side (local, slurm submits).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.")
_RERUN_FAILED = flags.DEFINE_bool("rerun_failed", True, "Run trials that failed before again.")
_PYTHON = flags.DEFINE_string("python", None, "Python of the trials (default: this one here, "
                              "'python' on TPU VMs and Slurm nodes).")
_JAX_CACHE = flags.DEFINE_string("jax_cache_dir", "", "local: a JAX compilation cache the "
                                 "trials share, e.g. DIR/.jax_cache (seeds of a model compile "
                                 "the same programs once).")
_TPU = flags.DEFINE_string("tpu", "", "tpu_vm: the TPU VM's name.")
_ZONE = flags.DEFINE_string("zone", "", "tpu_vm: its zone.")
_PROJECT = flags.DEFINE_string("project", "", "tpu_vm: the GCP project (default: gcloud's).")
_REMOTE_WORKDIR = flags.DEFINE_string("remote_workdir", "", "tpu_vm: the trials' workdirs' root "
                                      "as the workers see it, e.g. gs://bucket/sweep "
                                      "(default: --workdir).")
_REMOTE_CD = flags.DEFINE_string("remote_cd", "", "tpu_vm: the repository's folder on the "
                                 "workers (default: their home folder).")
_SLURM_NODES = flags.DEFINE_integer("slurm_nodes", 1, "slurm: nodes a trial (one process each).")
_SLURM_PARTITION = flags.DEFINE_string("slurm_partition", "", "slurm: partition.")
_SLURM_TIME = flags.DEFINE_string("slurm_time", "", "slurm: time limit, e.g. 24:00:00.")
_SLURM_GPUS = flags.DEFINE_integer("slurm_gpus_per_node", 0, "slurm: GPUs a node (0: none asked).")
_SLURM_LINES = flags.DEFINE_multi_string("slurm_sbatch", [], "slurm: more #SBATCH options, "
                                         "e.g. --slurm_sbatch=--account=me.")
_RESUBMIT = flags.DEFINE_bool("resubmit", False, "slurm: submit unfinished submitted trials again.")
flags.mark_flags_as_required(["config", "sweep", "workdir"])


def make_launcher():
    if _LAUNCHER.value == "tpu_vm":
        if _PARALLEL.value != 1:
            raise app.UsageError("--launcher=tpu_vm runs one trial at a time on its TPU VM")
        return sweep_lib.TpuVmLauncher(tpu=_TPU.value, zone=_ZONE.value, project=_PROJECT.value,
                                       remote_workdir=_REMOTE_WORKDIR.value,
                                       python=_PYTHON.value or "python", remote_cd=_REMOTE_CD.value)
    if _LAUNCHER.value == "slurm":
        return sweep_lib.SlurmLauncher(nodes=_SLURM_NODES.value, partition=_SLURM_PARTITION.value,
                                       time_limit=_SLURM_TIME.value,
                                       gpus_per_node=_SLURM_GPUS.value,
                                       sbatch_lines=_SLURM_LINES.value,
                                       python=_PYTHON.value or "python")
    return sweep_lib.LocalLauncher(python=_PYTHON.value or sys.executable,
                                   jax_cache_dir=_JAX_CACHE.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config_flag = flags.FLAGS["config"]
    try:
        trials = sweep_lib.make_trials(config_flags.get_config_filename(config_flag),
                                       _SWEEP.value,
                                       base_fields=config_flags.get_override_values(config_flag))
        launcher = make_launcher()
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    stop = threading.Event()

    def on_signal(signum, frame):
        print(f"sweep: signal {signum}: stopping; running trials save a checkpoint", flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    summary = sweep_lib.run_sweep(trials, launcher, workdir=_WORKDIR.value,
                                  parallel=_PARALLEL.value, dry_run=_DRY_RUN.value,
                                  rerun_failed=_RERUN_FAILED.value, resubmit=_RESUBMIT.value,
                                  print_fn=lambda line: print(line, flush=True), stop=stop)
    if summary.failed or summary.interrupted:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)

r"""Trains one model of any experiment family: flags -> `stn_jax.train.train_and_evaluate`.

Half a minute of training on 2 CPU cores (ST-CNN on distorted MNIST RTS, `runlocal` size):

  python -m experiments.train --config=configs/mnist_rts.py:runlocal=True --workdir=/tmp/run

The paper's schedule (for an accelerator), another model, or one field changed:

  python -m experiments.train --config=configs/mnist_rts.py
  python -m experiments.train --config=configs/mnist_e.py:model=st_cnn,transform=tps \
      --workdir=/tmp/mnist_e_tps
  python -m experiments.train --config=configs/mnist_rts.py:runlocal=True \
      --config.train.num_steps=500 --workdir=/tmp/run500

Without --workdir the run goes to runs/<config name>[_<variants>] under the current folder
(printed at the start). Running the same command again resumes from the newest checkpoint
(or re-evaluates a finished run). Results: `<workdir>/metrics.json`, pictures in
`<workdir>/pictures/`, TensorBoard logs in `<workdir>/tb`.

Many hosts (a TPU pod, a Slurm or MPI GPU cluster): the same command on every host with
--distributed (`jax.distributed.initialize()` finds the others by itself there); elsewhere give
--coordinator_address, --num_processes and --process_id, e.g. two processes on one machine:

  python -m experiments.train --config=configs/mnist_rts.py:runlocal=True --workdir=/tmp/two \
      --distributed --coordinator_address=localhost:12355 --num_processes=2 --process_id=0 &
  python -m experiments.train --config=configs/mnist_rts.py:runlocal=True --workdir=/tmp/two \
      --distributed --coordinator_address=localhost:12355 --num_processes=2 --process_id=1

A stop by SIGTERM or Ctrl-C saves a checkpoint and exits with status 75 (rerun to resume); a
bad config or flag exits with status 2 and one line saying what is wrong.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/mnist_rts.py:runlocal=True.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Where checkpoints, logs, pictures and metrics.json go (default: runs/<config>_<variants>).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (pods, clusters).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --distributed; default: auto).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with --distributed; default: auto).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (with --distributed; default: auto).")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
    """runs/<config file stem>[_<variants>] for a --config value like 'configs/x.py:a=1,b=2'.

    Example:
        >>> default_workdir("configs/mnist_rts.py:model=cnn,runlocal=True")
        'runs/mnist_rts_model=cnn,runlocal=True'
    """
    path, _, variants = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    variants = re.sub(r"[^A-Za-z0-9=,._-]+", "_", variants.replace(" ", ""))
    return os.path.join("runs", name + (f"_{variants}" if variants else ""))


def _initialize_distributed() -> None:
    import jax

    kwargs = {k: v for k, v in (("coordinator_address", _COORDINATOR.value),
                                ("num_processes", _NUM_PROCESSES.value),
                                ("process_id", _PROCESS_ID.value)) if v is not None}
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU collectives between processes (tests, one machine); accelerators bring their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def fail(message: str) -> None:
    """Prints one line, 'error: <message>', to stderr and exits with status 2 (a usage error)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _root_message(error: BaseException) -> str:
    """The innermost cause of a chain of exceptions, in one line (absl and ml_collections
    wrap a config error in two or three others, each repeating a traceback)."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    hinted = [e for e in chain if "did you mean" in str(e).lower()]
    error = hinted[0] if hinted else chain[-1]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    if hint:  # ml_collections' message for a misspelt field of a locked config.
        return f"unknown config field \"{hint.group(2)}\": did you mean \"{hint.group(1)}\"?"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"


def _did_you_mean(message: str) -> str:
    """Adds the closest config field to an 'Unknown command line flag config.x' message."""
    match = re.search(r"Unknown command line flag '(config\.[\w.]+)'", message)
    config = _CONFIG.value if match and flags.FLAGS["config"].present else None
    if config is None:
        return message
    fields = ["config." + k for k in _flatten(config.to_dict())]
    close = difflib.get_close_matches(match.group(1), fields, n=1)
    return message + (f" (did you mean --{close[0]}?)" if close else "")


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every error as one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(_did_you_mean(_root_message(e)))
    except (AttributeError, ValueError, TypeError, OSError, KeyError) as e:
        fail(_root_message(e))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    if not _DISTRIBUTED.value and any(
            f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
        fail("--coordinator_address/--num_processes/--process_id need --distributed")
    try:
        config = _CONFIG.value
        config.get("task")  # A file that failed to load gives a placeholder that raises here.
    except (OSError, AttributeError, ValueError) as e:
        fail(_root_message(e))
    # jax says at INFO that it found no TPU on every machine without one: not news.
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    from stn_jax import train  # After flag parsing: --help and flag errors stay fast.

    try:
        train.check_config(config)  # Names and numbers, before jax starts any device.
    except ValueError as e:
        fail(str(e))
    if _DISTRIBUTED.value:
        _initialize_distributed()
    import jax

    try:
        train.check_config(config, num_devices=jax.device_count())
    except ValueError as e:
        fail(str(e))
    workdir = _WORKDIR.value or default_workdir(_config_arg())
    logging.info("workdir: %s (config in %s)", os.path.abspath(workdir),
                 os.path.join(os.path.abspath(workdir), "config.json"))
    result = train.train_and_evaluate(config, workdir)
    if result.get("preempted"):
        sys.exit(train.PREEMPTED_EXIT_CODE)


def _config_arg() -> str:
    """The --config value as given on the command line (file and variants)."""
    for i, arg in enumerate(sys.argv[1:], 1):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return "config"


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

r"""Trains one distorted-MNIST model: flags -> `stn_jax.train.train_and_evaluate`.

Half a minute of training on 2 CPU cores (ST-CNN on RTS at the config's `runlocal` size):

  python -m experiments.train --config=configs/mnist_rts.py:runlocal=True --workdir=/tmp/run

The paper's schedule (150k steps; for an accelerator), another model, or one field changed:

  python -m experiments.train --config=configs/mnist_rts.py --workdir=/tmp/mnist_rts
  python -m experiments.train --config=configs/mnist_e.py:model=st_cnn,transform=tps \
      --workdir=/tmp/mnist_e_tps
  python -m experiments.train --config=configs/mnist_rts.py:runlocal=True \
      --config.train.num_steps=500 --workdir=/tmp/run500

Running the same command again on the same workdir resumes from its newest checkpoint (or just
re-evaluates a finished run). Results: `<workdir>/metrics.json`, pictures in
`<workdir>/pictures/`, TensorBoard logs in `<workdir>/tb` (`tensorboard --logdir <workdir>/tb`).
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from stn_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/mnist_rts.py:runlocal=True.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs, pictures and metrics.json go."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.info("config:\n%s", _CONFIG.value)
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)

r"""Distorted MNIST E (elastic: scaled, thin plate spline warp; Sect. 4.1, Table 1).

The paper's schedule (150k steps of batch 256, meant for an accelerator):

    python -m experiments.train --config=configs/mnist_e.py --workdir=/tmp/mnist_e

A run sized for a 2-core CPU (`runlocal`: see `configs/common.py`, `mnist_config`):

    python -m experiments.train --config=configs/mnist_e.py:runlocal=True --workdir=/tmp/run

Variants after the colon, e.g. `configs/mnist_e.py:model=cnn,transform=tps,runlocal=True`:
    model:     fcn | cnn | st_fcn | st_cnn   (default st_cnn)
    transform: affine | projective | tps     (default affine; used by st_* models only)
    runlocal:  False | True                  (default False)
Single fields change with flags, e.g. `--config.train.num_steps=1000`; the config is locked, so
a misspelt field fails before any work. Every field and its source: `configs/common.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (the repository root is now importable)


def get_config(arg=None):
    """The locked config; `arg` is the 'key=value,...' text after the colon."""
    return common.mnist_config("E", arg)


def get_sweep(name):
    """The trials of a named sweep (table1, tc, column, cnn_vs_st: see common.mnist_sweeps), e.g.
    `python -m experiments.sweep --config=configs/mnist_e.py:runlocal=True --sweep=column --workdir=DIR`.
    """
    return common.sweep(common.mnist_sweeps("E"), name)

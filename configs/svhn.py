r"""SVHN multi-digit recognition (Sect. 4.2, Table 2): one command per cell of the table.

The paper's schedule (400k steps of batch 128, meant for an accelerator), on the official
format-1 files (`train/`, `test/`, `extra/` or their .tar.gz archives, prepared once into a
cache, see `stn_jax/data/svhn.py`):

    python -m experiments.train --config=configs/svhn.py:size=64,model=st_multi --config.data.dir=/data/svhn --workdir=DIR
    python -m experiments.train --config=configs/svhn.py:size=128,model=cnn --config.data.dir=/data/svhn --workdir=DIR

Without `data.dir` the data are `mnist_sequences` (house-number-like images of real MNIST
digits, generated; a loud warning says so): not SVHN, not comparable with the paper.
A run sized for a 2-core CPU, on mnist_sequences unless a folder is given (`runlocal` below):

    python -m experiments.train --config=configs/svhn.py:model=st_single,runlocal=True --workdir=DIR

Variants after the colon, e.g. `configs/svhn.py:size=128,model=st_single,runlocal=True`:
    model:    cnn | st_single | st_multi   (default st_multi)
    size:     64 | 128                     (default 64: the tight framing; 128: the loose one)
    runlocal: False | True                 (default False)
Single fields change with flags, e.g. `--config.data.use_extra=False`; the config is locked,
so a misspelt field fails before any work. [S] marks the settings docs/experiment_details.md takes from
the paper's sources, [?] what nobody says.

`runlocal=True` shrinks the same experiment for 2 CPU cores (minutes a model): the classifier
at an eighth of the paper's width (`model.width`; its filters 6-24, FC 384), 1500 steps of batch
32 with momentum 0.9 and batch norm (ten layers deep, plain SGD barely moves in a CPU's number
of steps), the learning rate divided by 10 after 1000, no dropout (every batch is freshly
generated and the run short: nothing to overfit [?: not compared with 0.5]), the
localisation lr 0.01x (momentum makes each step ~10x plain SGD's), a 1000-number test set;
weight decay and the localisation nets unchanged.
Measured here: docs/results/svhn.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402  (the repository root is now importable)

import ml_collections  # noqa: E402

CHOICES = {
    "model": ("cnn", "st_single", "st_multi"),
    "size": ("64", "128"),
    "runlocal": common.TRUE_FALSE,
}
DEFAULTS = {"model": "st_multi", "size": "64", "runlocal": "False"}


def get_config(arg=None):
    """The locked config; `arg` is the 'key=value,...' text after the colon."""
    args = common.parse_variants(arg, CHOICES, DEFAULTS)
    runlocal = args["runlocal"] == "True"
    size = int(args["size"])

    config = ml_collections.ConfigDict()
    config.task = "svhn"  # The experiment family (stn_jax.tasks.svhn).
    config.seed = 0  # Seeds the model init, the training data stream and the step keys.

    config.data = data = ml_collections.ConfigDict()
    data.source = "auto"  # auto (svhn if dir is set, else mnist_sequences) | svhn | mnist_sequences.
    data.dir = ""  # Folder of the official format-1 train/, test/, extra/ (or their .tar.gz).
    data.cache_dir = ""  # Where the prepared arrays go; "" = <dir>/stn_jax_cache if writable.
    data.size = size  # 64: boxes' union +30% framed [P]; 128: a frame twice as large [?].
    data.use_extra = not runlocal  # Train on train + extra [? Goodfellow et al. do].
    data.num_validation = 5000  # Images held out of train (+ extra) for validation [S].
    data.eval_split = "test"  # What the evaluations cover: test | validation.
    data.random_crop = False  # Train on random crop_size crops, test on centre crops [?].
    data.crop_size = 54 if size == 64 else 108  # Goodfellow's 54 of 64 [S], scaled for 128 [?].
    data.limit = -1  # Read only the first N entries of each digitStruct.mat; -1 = all.
    data.num_test = 1000 if runlocal else 10_000  # mnist_sequences: numbers in the test set.
    data.test_seed = 0  # mnist_sequences: seeds the fixed test set.
    data.max_length = 5  # mnist_sequences: numbers have 1 to max_length digits.

    config.model = model = ml_collections.ConfigDict()
    model.name = args["model"]  # cnn | st_single | st_multi.
    # After every hidden layer but the first conv and the loc nets [S]; runlocal: none (above).
    model.dropout = 0.0 if runlocal else 0.5
    model.batch_norm = runlocal  # Batch norm in the classifier [? not in the paper].
    model.width = 0.125 if runlocal else 1.0  # Multiplies the classifier's filters and FC units.

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 32 if runlocal else 128  # Global batch, split over all devices [S].
    train.learning_rate = 0.01  # Initial learning rate [S].
    train.momentum = 0.9 if runlocal else 0.0  # 0 = plain SGD [? the paper says only "SGD"].
    train.lr_decay_every = 1000 if runlocal else 80_000  # Steps between lr decays [S].
    train.lr_decay_factor = 0.1  # The lr is multiplied by this at each decay [S].
    # The transformers' lr / the rest's: 0.1 [S] with plain SGD. With runlocal's momentum 0.9
    # every step is ~10x plain SGD's, so 0.01 keeps the paper's localisation step; at 0.1
    # Single's transformer left the image and Single and Multi stayed at chance on one-digit
    # numbers (measured: docs/results/svhn.md).
    train.loc_lr_multiplier = 0.01 if runlocal else 0.1
    train.num_steps = 1500 if runlocal else 400_000  # Training steps [S].
    train.weight_decay = 5e-4  # L2 weight decay [S].
    train.eval_batch_size = 250 if runlocal else 500  # A multiple of the device count.

    config.log_every = 100 if runlocal else 500  # Steps between training logs.
    config.eval_every = 500 if runlocal else 10_000  # Steps between evaluations and pictures.
    config.checkpoint_every = 500 if runlocal else 10_000  # Steps between checkpoints.
    config.num_pictures = 8  # Test numbers drawn in each picture.
    config.runlocal = runlocal  # True: the small CPU-sized run described above.

    config.lock()
    return config


def get_sweep(name):
    """The trials of a named sweep (table2: the six cells of Table 2 x 3 seeds), e.g.
    `python -m experiments.sweep --config=configs/svhn.py --sweep=table2 --workdir=DIR`.
    """
    return common.sweep(common.svhn_sweeps(), name)

r"""Config pieces shared by the config files: the variant parser and the MNIST family.

A config file is thin: it names its experiment and calls in here, e.g. configs/mnist_rts.py:

    def get_config(arg=None):
        return common.mnist_config("RTS", arg)

Variants are `key=value` pairs after the colon (`configs/mnist_rts.py:model=cnn,runlocal=True`),
checked by `parse_variants` before anything else runs. Each distortion's paper settings live in
`stn_jax.data.distortions.PAPER_SETTINGS`, which the data code reads too: one place.

Config files load this module with `from configs import common` after putting the repository
root on sys.path, so a config loaded by path from any folder finds it.
"""

from __future__ import annotations

import difflib

import ml_collections

from stn_jax.data.distortions import PAPER_SETTINGS

TRUE_FALSE = ("False", "True")


def parse_variants(arg: str | None, choices: dict[str, tuple[str, ...]],
                   defaults: dict[str, str]) -> dict[str, str]:
    """Parses 'key=value,...' (the text after the config file's colon) against `choices`.

    Args:
        arg: the variant string, or None.
        choices: every known key and its valid values (as strings).
        defaults: the value of each key not given.

    Returns:
        {key: value} for every key of `choices`.

    Raises:
        ValueError: an item that is not key=value, an unknown key (with a did-you-mean) or a
            value not in the key's choices, naming it.

    Example:
        >>> parse_variants("model=cnn", {"model": ("cnn", "st_cnn")}, {"model": "st_cnn"})
        {'model': 'cnn'}
    """
    parsed = dict(defaults)
    for item in filter(str.strip, (arg or "").split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"config variant {item!r}: expected key=value, key in {list(choices)}")
        if key not in choices:
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"config variant {key!r} is unknown{hint}: valid keys are {list(choices)}")
        if value not in choices[key]:
            raise ValueError(
                f"config variant {key}={value!r}: valid values are {list(choices[key])}")
        parsed[key] = value
    return parsed


MNIST_CHOICES = {
    "model": ("fcn", "cnn", "st_fcn", "st_cnn"),
    "transform": ("affine", "projective", "tps"),
    "runlocal": TRUE_FALSE,
}
_MNIST_DEFAULTS = {"model": "st_cnn", "transform": "affine", "runlocal": "False"}


def mnist_config(distortion: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The locked config of one distorted-MNIST experiment (Table 1 and the TC text).

    Args:
        distortion: "R" | "RTS" | "P" | "E" | "TC": whose paper settings the data takes.
        arg: the variants after the config file's colon: model (fcn | cnn | st_fcn | st_cnn,
            default st_cnn), transform (affine | projective | tps, default affine; ST models
            only), runlocal (False | True).

    `runlocal=True` is the same experiment shrunk for 2 CPU cores: 4000 training digits
    instead of all 60000, 1500 steps of batch 64 instead of 150k of batch 256, the learning
    rate divided by 10 at step 1000 instead of every 50k, and SGD with momentum 0.9 instead of
    plain SGD (which does not get far in 1500 steps), with the spatial transformer's learning
    rate 0.1x the rest's (`train.loc_lr_multiplier`): with momentum its full-rate steps flew it
    off the TC canvas within 500 steps for good (90% test error; 6.2% with 0.1x). On TC the
    transformer's output keeps the input's 60x60 (`model.st_downsample=1`; the paper's 30x30
    halves the digit when, as in 1500 steps, the transformer does not zoom in). Data generation
    and the other model settings are unchanged; the defaults are the paper's.
    """
    if distortion not in PAPER_SETTINGS:
        raise ValueError(f"distortion must be one of {tuple(PAPER_SETTINGS)}, got {distortion!r}")
    args = parse_variants(arg, MNIST_CHOICES, _MNIST_DEFAULTS)
    runlocal = args["runlocal"] == "True"
    paper = PAPER_SETTINGS[distortion]

    config = ml_collections.ConfigDict()
    config.task = "mnist"  # The experiment family (stn_jax.tasks.mnist).
    config.seed = 0  # Seeds the model init, the training data stream and the step keys.

    config.data = data = ml_collections.ConfigDict()
    data.source = "auto"  # auto (tfds if it can be had, else bundled) | tfds | idx | bundled.
    data.tfds_dir = ""  # tfds data_dir; "" = tfds's default.
    data.idx_dir = ""  # Folder with the four MNIST idx files, for source="idx".
    data.distortion = distortion  # R | RTS | P | E | TC.
    data.fixed_train = False  # True: one fixed distorted training set; False: fresh ones [?].
    data.test_seed = 0  # Seeds the fixed distorted test set.
    data.bundled_test_fraction = 0.2  # Share of the bundled digits held out as the test set.
    data.num_train = 4000 if runlocal else -1  # Training digits to use; -1 = all.
    data.num_test = -1  # Test digits to use; -1 = all.
    for field, value in paper.items():  # canvas, rotation, scale, P/E/TC settings, tagged there.
        data[field] = value

    config.model = model = ml_collections.ConfigDict()
    model.name = args["model"]  # fcn | cnn | st_fcn | st_cnn.
    model.transform = args["transform"]  # affine | projective | tps (st_* only).
    model.st_downsample = 2 if distortion in ("RTS", "TC") else 1  # ST output side / input's [S].
    if runlocal and distortion == "TC":
        # [open] In 1500 steps the transformer centres the digit but does not zoom in, so a
        # 30x30 output halves the digit. Validation error at 1: 4.9%, at 2: 7.7%, the CNN's:
        # 6.7% (docs/results/tc_study.md).
        model.st_downsample = 1  # TC runlocal: the ST output is the 60x60 input's size.
    model.reference_width = 128  # FCN hidden width whose parameter count all models match [?].

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 64 if runlocal else 256  # Global batch, split over all devices [S].
    train.learning_rate = 0.01  # Initial learning rate [S].
    train.momentum = 0.9 if runlocal else 0.0  # 0 = plain SGD [? the paper says only "SGD"].
    train.lr_decay_every = 1000 if runlocal else 50_000  # Steps between lr decays [S].
    train.lr_decay_factor = 0.1  # The lr is multiplied by this at each decay [S].
    train.loc_lr_multiplier = 0.1 if runlocal else 1.0  # Transformer's lr / the rest's [S: 1].
    train.num_steps = 1500 if runlocal else 150_000  # Training steps [S].
    train.weight_decay = 0.0  # L2 weight decay [S: none].
    train.eval_batch_size = 512  # Test batch; like batch_size, a multiple of the device count.

    config.log_every = 100 if runlocal else 500  # Steps between console/TensorBoard training logs.
    config.eval_every = 500 if runlocal else 10_000  # Steps between evaluations and pictures.
    config.checkpoint_every = 500 if runlocal else 10_000  # Steps between checkpoints.
    config.num_pictures = 16  # Test digits drawn in each picture of what the transformer does.
    config.runlocal = runlocal  # True: the small CPU-sized run described above.

    config.lock()
    return config


# --- Sweeps: named lists of trials, plain data (run by `python -m experiments.sweep`) ----------
#
# A trial is a dict of overrides of the config file that the runner was given:
#   "config_file": "configs/mnist_r.py"   another config file (path from the repository root);
#   "model": "cnn"                        a variant (the text after the colon);
#   "config.seed": 1                      a field, as `--config.seed=1` would set it.
# The runner builds every trial's config before it runs anything, so an unknown sweep, variant
# or field fails at once.


def axis(key: str, values) -> list[dict]:
    """One override key over several values: one trial dict per value.

    Example:
        >>> axis("config.seed", [0, 1])
        [{'config.seed': 0}, {'config.seed': 1}]
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    return [{key: value} for value in values]


def product(*factors: list[dict]) -> list[dict]:
    """Every combination of one trial dict from each factor, merged left to right.

    Args:
        *factors: lists of override dicts (e.g. from `axis`, or lists written out).

    Returns:
        len(f1) * len(f2) * ... dicts, the last factor varying fastest.

    Raises:
        ValueError: two factors setting the same key in one combination.

    Example:
        >>> product(axis("model", ["fcn", "cnn"]), axis("config.seed", [0, 1]))[1]
        {'model': 'fcn', 'config.seed': 1}
    """
    trials = [{}]
    for factor in factors:
        merged = []
        for trial in trials:
            for overrides in factor:
                clash = set(trial) & set(overrides)
                if clash:
                    raise ValueError(f"factors of product both set {sorted(clash)}")
                merged.append({**trial, **overrides})
        trials = merged
    return trials


def zip_(*factors: list[dict]) -> list[dict]:
    """The i-th trial dicts of all factors merged (factors of equal length; `zip` is the builtin).

    Example:
        >>> zip_(axis("model", ["fcn", "cnn"]), axis("config.train.num_steps", [10, 20]))
        [{'model': 'fcn', 'config.train.num_steps': 10}, {'model': 'cnn', 'config.train.num_steps': 20}]
    """
    lengths = {len(factor) for factor in factors}
    if len(lengths) > 1:
        raise ValueError(f"factors of zip_ must have equal lengths, got {[len(f) for f in factors]}")
    return [product(*([overrides] for overrides in row))[0] for row in zip(*factors)]


def sweep(sweeps: dict[str, list[dict]], name: str) -> list[dict]:
    """The trials of the sweep called `name`; ValueError (with a did-you-mean) if there is none."""
    if name not in sweeps:
        close = difflib.get_close_matches(name, sweeps, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"sweep {name!r} is unknown{hint}: valid sweeps are {sorted(sweeps)}")
    return [dict(trial) for trial in sweeps[name]]


MNIST_CONFIG_FILES = {d: f"configs/mnist_{d.lower()}.py" for d in ("R", "RTS", "P", "E", "TC")}
MNIST_SEEDS = (0, 1, 2)  # Table 1 is a mean over 3 seeds [S].


def mnist_sweeps(distortion: str) -> dict[str, list[dict]]:
    """The named sweeps of the MNIST config files (each file offers all of them).

    table1:    Table 1: R, RTS, P, E x FCN, CNN, ST-FCN and ST-CNN (Aff, Proj, TPS) x 3 seeds (96).
    tc:        the TC line of the text: FCN, CNN, ST-FCN, ST-CNN (affine) x 3 seeds (12).
    column:    this file's distortion only, the 8 models of Table 1 x 3 seeds (24).
    cnn_vs_st: this file's distortion, ST-CNN Aff and CNN x 3 seeds (6; the faster first).

    Variants given with the runner's --config (e.g. `:runlocal=True`) apply to every trial.
    """
    if distortion not in MNIST_CONFIG_FILES:
        raise ValueError(f"distortion must be one of {tuple(MNIST_CONFIG_FILES)}, got {distortion!r}")
    seeds = axis("config.seed", MNIST_SEEDS)
    models = axis("model", ["fcn", "cnn"]) + product(
        axis("model", ["st_fcn", "st_cnn"]), axis("transform", ["affine", "projective", "tps"]))

    def files(*names):
        return axis("config_file", [MNIST_CONFIG_FILES[name] for name in names])

    return {
        "table1": product(files("R", "RTS", "P", "E"), models, seeds),
        "tc": product(files("TC"), axis("model", ["fcn", "cnn", "st_fcn", "st_cnn"]), seeds),
        "column": product(files(distortion), models, seeds),
        "cnn_vs_st": product(files(distortion),
                             [{"model": "st_cnn", "transform": "affine"}, {"model": "cnn"}], seeds),
    }


def svhn_sweeps() -> dict[str, list[dict]]:
    """The named sweeps for configs/svhn.py: table2, the cells of Table 2 (CNN, ST-CNN Single,
    ST-CNN Multi x 64 and 128 px) x 3 seeds (18)."""
    return {"table2": product(axis("config_file", ["configs/svhn.py"]),
                              axis("model", ["cnn", "st_single", "st_multi"]),
                              axis("size", ["64", "128"]), axis("config.seed", MNIST_SEEDS))}


def cub_sweeps() -> dict[str, list[dict]]:
    """The named sweeps for configs/cub.py: table3, the paper's four cells of Table 3 (CNN 224 px,
    2xST-CNN 224 and 448 px, 4xST-CNN 448 px) x 3 seeds (12)."""
    cells = [{"num_st": num_st, "size": size}
             for num_st, size in (("0", "224"), ("2", "224"), ("2", "448"), ("4", "448"))]
    return {"table3": product(axis("config_file", ["configs/cub.py"]), cells,
                              axis("config.seed", MNIST_SEEDS))}

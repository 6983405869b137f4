"""The SVHN multi-digit family (Sect. 4.2, Table 2): CNN, ST-CNN Single and ST-CNN Multi.

Data (`config.data.source`): "svhn" reads the official format-1 files of `data.dir`
(`stn_jax.data.svhn`); "mnist_sequences" renders house-number-like images from the bundled
MNIST digits (`stn_jax.data.mnist_sequences`), for CPU runs and tests; "auto" is "svhn" when
`data.dir` is set, else "mnist_sequences" with a loud warning. Models: `stn_jax.models.svhn`.
Loss: the sum over the five positions of the softmax cross-entropy over 11 classes (the digits
and "no digit"), averaged over the batch [?: Goodfellow et al. maximise the sum of the
positions' log-likelihoods]. The table's number: the sequence error, the share of test numbers
with any of the five positions wrong, in percent (`test_error_pct`), and the error of each
position. Pictures: each test number with the region each transformer samples outlined on it
(Multi's deeper transformers composed back onto the input), what each transformer sees, and
the predicted and true strings.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stn_jax.data import mnist_sequences
from stn_jax.data import svhn as svhn_data
from stn_jax.models import count_params
from stn_jax.models import svhn as svhn_models
from stn_jax.tasks.base import Task
from stn_jax.train import pictures

SOURCES = ("auto", "svhn", "mnist_sequences")
EVAL_SPLITS = ("test", "validation")
NUM_POSITIONS = svhn_models.NUM_POSITIONS


def sequence_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Loss and accuracies of logits (B, 5, 11) against batch["label"] (B, 5).

    Returns:
        (mean over the batch of the summed per-position cross-entropies, {"accuracy": share
        of numbers entirely right, "digit_accuracy": share of positions right}).

    Example:
        >>> logits = jax.nn.one_hot(jnp.array([[2, 1, 0, 10, 10]]), 11) * 100.0
        >>> float(sequence_loss(logits, {"label": jnp.array([[2, 1, 0, 10, 10]])})[1]["accuracy"])
        1.0
    """
    labels = batch["label"]
    per_position = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    right = jnp.argmax(logits, -1) == labels
    return jnp.mean(jnp.sum(per_position, -1)), {
        "accuracy": jnp.mean(jnp.all(right, -1)),
        "digit_accuracy": jnp.mean(right),
    }


def sequence_sums(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Masked sums over one padded batch: "sequence_correct", "position_correct" (5,),
    "loss" (summed per-position cross-entropies) and "count"."""
    labels, mask = batch["label"], batch["mask"]
    right = jnp.argmax(logits, -1) == labels
    loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels), -1)
    return {
        "sequence_correct": jnp.sum(jnp.all(right, -1) * mask),
        "position_correct": jnp.sum(right * mask[:, None], 0),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
    }


def sequence_summary(totals: dict[str, np.ndarray]) -> dict[str, Any]:
    """test_error_pct (sequence error), position<i>_error_pct, test_loss, num_test.

    Example:
        >>> sequence_summary({"sequence_correct": 3.0, "position_correct": np.array(
        ...     [4.0, 4, 3, 4, 4]), "loss": 2.0, "count": 4.0})["test_error_pct"]
        25.0
    """
    n = int(round(float(totals["count"])))
    out = {
        "test_error_pct": 100.0 * (1.0 - float(totals["sequence_correct"]) / n),
        "test_loss": float(totals["loss"]) / n,
        "num_test": n,
    }
    for i, correct in enumerate(np.asarray(totals["position_correct"]).tolist()):
        out[f"position{i + 1}_error_pct"] = 100.0 * (1.0 - correct / n)
    return out


class SvhnTask(Task):
    """SVHN multi-digit: `config.data` (source, dir, size, ...), `config.model` (name,
    dropout, batch_norm, width); see configs/svhn.py for every field."""

    name = "svhn"

    def source(self) -> str:
        """The data source actually used: "svhn" or "mnist_sequences"."""
        data = self.config.data
        if data.source == "auto":
            return "svhn" if data.dir else "mnist_sequences"
        return data.source

    def check_config(self) -> None:
        data, model = self.config.data, self.config.model
        if model.name not in svhn_models.MODEL_NAMES:
            raise ValueError(f"config.model.name must be one of {svhn_models.MODEL_NAMES}, "
                             f"got {model.name!r}")
        if not 0.0 <= model.dropout < 1.0:
            raise ValueError(f"config.model.dropout must be in [0, 1), got {model.dropout!r}")
        if not model.width > 0:
            raise ValueError(f"config.model.width must be positive, got {model.width!r}")
        if data.source not in SOURCES:
            raise ValueError(f"config.data.source must be one of {SOURCES}, got {data.source!r}")
        if data.size not in svhn_data.SIZES:
            raise ValueError(f"config.data.size must be one of {svhn_data.SIZES}, "
                             f"got {data.size!r}")
        if data.random_crop and not 0 < data.crop_size <= data.size:
            raise ValueError(f"config.data.crop_size must be in [1, {data.size}] with "
                             f"random_crop, got {data.crop_size!r}")
        if data.eval_split not in EVAL_SPLITS:
            raise ValueError(f"config.data.eval_split must be one of {EVAL_SPLITS}, "
                             f"got {data.eval_split!r}")
        if data.limit != -1 and data.limit < 1:
            raise ValueError(f"config.data.limit must be -1 (all) or >= 1, got {data.limit!r}")
        if self.source() == "svhn":
            if not data.dir:
                raise ValueError("config.data.source='svhn' needs config.data.dir: the folder "
                                 "with the official format-1 train/, test/ (and extra/) folders "
                                 "or their .tar.gz archives")
            if not os.path.isdir(data.dir):
                raise ValueError(f"config.data.dir={data.dir!r} is not a folder: it must hold "
                                 "the SVHN format-1 train/, test/ (and extra/) folders or "
                                 "train.tar.gz, test.tar.gz (and extra.tar.gz) from "
                                 "http://ufldl.stanford.edu/housenumbers/")
        elif data.num_test < 1:
            raise ValueError(f"config.data.num_test must be >= 1, got {data.num_test!r}")
        elif not 1 <= data.max_length <= svhn_data.MAX_DIGITS:
            raise ValueError(f"config.data.max_length must be in [1, {svhn_data.MAX_DIGITS}], "
                             f"got {data.max_length!r}")

    def make_dataset(self):
        data, seed = self.config.data, self.config.seed
        crop = data.crop_size if data.random_crop else 0
        if self.source() == "svhn":
            return svhn_data.SvhnDataset(
                data.dir, size=data.size, seed=seed, use_extra=data.use_extra,
                num_validation=data.num_validation, eval_split=data.eval_split, crop=crop,
                random_crop=data.random_crop, limit=data.limit, cache_dir=data.cache_dir)
        if data.source == "auto":
            logging.warning(
                "config.data.dir is empty: training on mnist_sequences (house-number-like "
                "images of MNIST digits), NOT SVHN; results are not comparable with the paper's. "
                "Give --config.data.dir=<folder of the format-1 files> for SVHN.")
        return mnist_sequences.MnistSequencesDataset(
            size=data.size, seed=seed, num_test=data.num_test, test_seed=data.test_seed,
            crop=crop, random_crop=data.random_crop, max_length=data.max_length)

    def create_model(self, dataset, *, rngs: nnx.Rngs) -> svhn_models.SvhnClassifier:
        model = self.config.model
        return svhn_models.create_model(
            model.name, input_shape=dataset.image_shape, dropout=model.dropout,
            batch_norm=model.batch_norm, width=model.width, rngs=rngs)

    def loss(self, outputs, batch):
        return sequence_loss(outputs, batch)

    def eval_sums(self, outputs, batch):
        return sequence_sums(outputs, batch)

    def summarize(self, totals):
        return sequence_summary(totals)

    def picture(self, model, examples, *, title):
        images = jnp.asarray(examples["image"])
        predictions = np.asarray(jnp.argmax(model(images), -1))
        views = [{k: (v if k == "name" else np.asarray(v)) for k, v in view.items()}
                 for view in model.transformer_views(images)]
        # Each transformer's panel shows the input read at its grid composed onto the input
        # ("input_view"): st2-st4 work on feature maps.
        return pictures.render(np.asarray(images), labels=np.asarray(examples["label"]),
                               predictions=predictions, views=views, title=title,
                               columns=2 if len(views) > 1 else 4, label_text=number_text)

    def describe(self, dataset, model):
        parts = {name: count_params(t) for name, t in
                 zip([f"st{i + 1}" for i in range(len(model.transformers))], model.transformers)}
        where = ", ".join(f"{k} {v}" for k, v in parts.items())
        return (f"svhn {self.config.model.name} (width {self.config.model.width}) on "
                f"{dataset.source} data at {self.config.data.size} px ({dataset.num_train} "
                f"train, {dataset.num_test} eval, input {dataset.image_shape}), "
                f"{count_params(model)} params" + (f" (transformers: {where})" if where else ""))


# ------------------------------------------------------------------------------- pictures


def number_text(label: np.ndarray) -> str:
    """A (5,) label row (10 = no digit) as the number's text, "-" for none."""
    return svhn_data.decode_labels(label) or "-"


TASK = SvhnTask

"""The distorted-MNIST family (Table 1 and the TC text): R, RTS, P, E and TC.

Data: `stn_jax.data.pipeline.DistortedMNIST` from `config.data`; models: the Table-1 FCN, CNN,
ST-FCN and ST-CNN of `stn_jax.models.mnist` from `config.model`; loss: softmax cross-entropy
over 10 digits; the table's number: the test error in percent; pictures: each test digit with
the transformer's sampling grid drawn on it, the transformer's output, the prediction.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from stn_jax import grids
from stn_jax.data import pipeline
from stn_jax.models import count_params
from stn_jax.models import mnist as mnist_models
from stn_jax.tasks.base import Task
from stn_jax.train import pictures


def classification_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Mean softmax cross-entropy of logits (B, K) against batch["label"] (B,), and accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def classification_sums(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Masked sums of correct predictions, loss and examples over one padded batch."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    mask = batch["mask"]
    return {
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
    }


def classification_summary(totals: dict[str, np.ndarray]) -> dict[str, Any]:
    """test_error_pct, test_accuracy, test_loss and num_test from `classification_sums`."""
    n = int(round(float(totals["count"])))
    accuracy = float(totals["correct"]) / n
    return {
        "test_error_pct": 100.0 * (1.0 - accuracy),
        "test_accuracy": accuracy,
        "test_loss": float(totals["loss"]) / n,
        "num_test": n,
    }


class MnistTask(Task):
    """Distorted MNIST: `config.data` as `DistortedMNIST` takes it, `config.model` with name,
    transform, st_downsample and reference_width."""

    name = "mnist"

    def check_config(self) -> None:
        model = self.config.model
        if model.name not in mnist_models.MODEL_NAMES:
            raise ValueError(f"config.model.name must be one of {mnist_models.MODEL_NAMES}, "
                             f"got {model.name!r}")
        if model.transform not in grids.KINDS:
            raise ValueError(f"config.model.transform must be one of {grids.KINDS}, "
                             f"got {model.transform!r}")
        pipeline.check_data_config(self.config.data)

    def make_dataset(self) -> pipeline.DistortedMNIST:
        return pipeline.DistortedMNIST(self.config.data, seed=self.config.seed)

    def create_model(self, dataset, *, rngs: nnx.Rngs) -> mnist_models.MnistClassifier:
        model = self.config.model
        return mnist_models.create_model(
            model.name,
            transform=model.transform,
            input_shape=dataset.image_shape,
            num_classes=dataset.num_classes,
            st_downsample=model.st_downsample,
            reference_width=model.reference_width,
            rngs=rngs,
        )

    def loss(self, outputs, batch):
        return classification_loss(outputs, batch)

    def eval_sums(self, outputs, batch):
        return classification_sums(outputs, batch)

    def summarize(self, totals):
        return classification_summary(totals)

    def picture(self, model, examples, *, title):
        images = examples["image"]
        logits = model(images)
        views = [{k: np.asarray(v[k]) for k in ("output", "grid")}
                 for v in model.transformer_views(images)]
        return pictures.render(
            images, labels=examples["label"], predictions=np.asarray(jnp.argmax(logits, -1)),
            views=views, title=title)

    def describe(self, dataset, model):
        return (f"{self.config.model.name}/{self.config.model.transform} on "
                f"{self.config.data.distortion} data ({dataset.source}, {dataset.num_train} "
                f"train digits, image {dataset.image_shape}), {count_params(model)} params")


TASK = MnistTask

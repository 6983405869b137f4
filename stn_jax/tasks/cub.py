"""The CUB-200-2011 family (Table 3): CNN and 2x/4x ST-CNN on pretrained backbones.

Data: `stn_jax.data.cub` (the official folder or TFDS) through its grain pipeline, from
`config.data`; model: `stn_jax.models.cub.CubModel` from `config.model`, every backbone started
from the same pretrained weights; loss: softmax cross-entropy; metrics: top-1 accuracy overall
and per class, the table's number `test_error_pct` = 100 - top-1 in percent; pictures: each
test image with the N crop boxes in distinct colours (the paper's Fig. 4) and the N crops.
"""

from __future__ import annotations

import os
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageDraw

from stn_jax.data import cub as cub_data
from stn_jax.models import backbones as backbones_lib
from stn_jax.models import count_params
from stn_jax.models import cub as cub_models
from stn_jax.tasks.base import Task

# Box colours of the transformers, in order (distinct at a glance).
COLOURS = ((255, 60, 60), (60, 200, 255), (255, 210, 0), (120, 255, 90), (255, 110, 255),
           (255, 150, 40))


def parse_class_ids(text: str) -> list[int] | None:
    """"" -> None (all classes); "1-10" or "1,5,9" or "1-3,7" -> a sorted list of ids.

    Example:
        >>> parse_class_ids("1-3,7")
        [1, 2, 3, 7]
    """
    if not text.strip():
        return None
    ids = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"data.class_ids: {part!r} is not an id or a range a-b") from None
        if first < 1 or last < first:
            raise ValueError(f"data.class_ids: {part!r} is not a range of positive ids")
        ids.update(range(first, last + 1))
    return sorted(ids)


def attention_box(theta: np.ndarray, height: int, width: int) -> tuple[float, ...]:
    """Pixel box (x0, y0, x1, y1) that an attention crop theta = (s, tx, ty) covers.

    With align_corners=False the crop's outer pixel edges sit at tx +- s, ty +- s of [-1, 1].

    Example:
        >>> attention_box(np.array([0.5, -0.5, 0.0]), 100, 200)
        (0.0, 25.0, 100.0, 75.0)
    """
    s, tx, ty = (float(v) for v in theta)
    return ((tx - s + 1) * width / 2, (ty - s + 1) * height / 2,
            (tx + s + 1) * width / 2, (ty + s + 1) * height / 2)


def render(images: np.ndarray, *, thetas: np.ndarray | None, crops: np.ndarray | None,
           labels: np.ndarray, predictions: np.ndarray, class_names, title: str) -> np.ndarray:
    """One row per image: the image with the N boxes, then the N crops (same colours).

    Args:
        images: (B, H, W, 3) RGB 0-255.
        thetas: (B, N, 3) attention parameters, or None (no transformer).
        crops: (B, N, h, w, 3) RGB 0-255, or None.
        labels, predictions: (B,) ints; class_names: names by label.
        title: the line on top.

    Returns:
        RGB uint8 (height, width, 3).
    """
    b, h, w, _ = images.shape
    n = 0 if thetas is None else thetas.shape[1]
    crop_side = h // 2
    pad, text = 6, 16
    width = pad + w + pad + n * (crop_side + pad)
    height = text + b * (h + text + pad) + pad
    canvas = Image.new("RGB", (max(width, 320), height), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), title, fill=(230, 230, 230))
    for i in range(b):
        top = text + i * (h + text + pad)
        canvas.paste(Image.fromarray(np.clip(images[i], 0, 255).astype(np.uint8)), (pad, top))
        for k in range(n):
            colour = COLOURS[k % len(COLOURS)]
            x0, y0, x1, y1 = attention_box(thetas[i, k], h, w)
            draw.rectangle([pad + x0, top + y0, pad + x1 - 1, top + y1 - 1], outline=colour,
                           width=2)
            crop = Image.fromarray(np.clip(crops[i, k], 0, 255).astype(np.uint8)).resize(
                (crop_side, crop_side), Image.BILINEAR)
            left = pad + w + pad + k * (crop_side + pad)
            canvas.paste(crop, (left, top))
            draw.rectangle([left, top, left + crop_side - 1, top + crop_side - 1],
                           outline=colour, width=2)
        right = int(predictions[i]) == int(labels[i])
        draw.text((pad, top + h + 2),
                  f"pred {class_names[int(predictions[i])]} / true {class_names[int(labels[i])]}",
                  fill=(90, 220, 90) if right else (255, 90, 90))
    return np.asarray(canvas)


class CubTask(Task):
    """CUB-200-2011: `config.data` (source, dir, class_ids, size, resize, loader threads),
    `config.model` (backbone, num_st, crop_size, scale, learn_scale, dropout, weights)."""

    name = "cub"

    def check_config(self) -> None:
        data, model = self.config.data, self.config.model
        if data.source not in cub_data.SOURCES:
            raise ValueError(f"config.data.source must be one of {cub_data.SOURCES}, "
                             f"got {data.source!r}")
        parse_class_ids(data.class_ids)
        if not isinstance(data.size, int) or data.size < 32:
            raise ValueError(f"config.data.size must be an int >= 32, got {data.size!r}")
        if not isinstance(data.resize, int) or data.resize < data.size:
            raise ValueError(f"config.data.resize must be an int >= data.size={data.size}, "
                             f"got {data.resize!r}")
        if model.backbone not in backbones_lib.BACKBONES:
            raise ValueError(f"config.model.backbone must be one of {backbones_lib.BACKBONES}, "
                             f"got {model.backbone!r}")
        if not isinstance(model.num_st, int) or model.num_st < 0:
            raise ValueError(f"config.model.num_st must be an int >= 0, got {model.num_st!r}")
        if not isinstance(model.crop_size, int) or not 32 <= model.crop_size:
            raise ValueError(f"config.model.crop_size must be an int >= 32, "
                             f"got {model.crop_size!r}")
        if not 0 < model.scale <= 1:
            raise ValueError(f"config.model.scale must be in (0, 1], got {model.scale!r}")
        if not 0 <= model.dropout < 1:
            raise ValueError(f"config.model.dropout must be in [0, 1), got {model.dropout!r}")
        if data.source == "dir" and not data.dir:
            raise ValueError("config.data.dir must name the CUB_200_2011 folder (images.txt, "
                             "images/, ...), e.g. --config.data.dir=/data/CUB_200_2011; or use "
                             "--config.data.source=tfds with caltech_birds2011 prepared")
        # Cheap and decisive: a missing folder or weights file fails here, in one line.
        if data.source == "dir" and not os.path.isdir(data.dir):
            raise ValueError(f"config.data.dir={data.dir!r} is not a folder: download "
                             "CUB_200_2011.tgz (Caltech's CUB-200-2011 page), unpack it and "
                             "pass --config.data.dir=PATH/CUB_200_2011")
        if not model.download:
            try:
                backbones_lib.weights_path(model.backbone, path=model.weights)
            except FileNotFoundError as e:
                raise ValueError(f"config.model.weights: {e}") from None

    def make_dataset(self) -> cub_data.CubDataset:
        data = self.config.data
        cub = cub_data.load_cub(source=data.source, dir=data.dir, tfds_dir=data.tfds_dir,
                                class_ids=parse_class_ids(data.class_ids))
        return cub_data.CubDataset(cub, size=data.size, resize=data.resize,
                                   seed=self.config.seed, num_threads=data.num_threads,
                                   num_workers=data.num_workers, prefetch=data.prefetch)

    def create_model(self, dataset, *, rngs: nnx.Rngs) -> cub_models.CubModel:
        model = self.config.model
        # Check the weights are there before building the (large) model.
        backbones_lib.weights_path(model.backbone, path=model.weights, download=model.download)
        net = cub_models.CubModel(
            backbone=model.backbone, num_classes=dataset.num_classes, num_st=model.num_st,
            image_size=self.config.data.size, crop_size=model.crop_size, scale=model.scale,
            learn_scale=model.learn_scale, dropout=model.dropout,
            batch_norm=model.batch_norm, seed=self.config.seed,
            rngs=rngs)
        self.weights_file = cub_models.load_pretrained_backbones(
            net, path=model.weights, download=model.download)
        self.class_names = dataset.class_names
        return net

    def loss(self, outputs, batch):
        loss = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"]).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(outputs, -1) == batch["label"])}

    def eval_sums(self, outputs, batch):
        mask = batch["mask"]
        correct = (jnp.argmax(outputs, -1) == batch["label"]) * mask
        onehot = jax.nn.one_hot(batch["label"], outputs.shape[-1]) * mask[:, None]
        loss = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"])
        return {"correct": correct.sum(), "loss": jnp.sum(loss * mask), "count": mask.sum(),
                "class_correct": onehot.T @ correct, "class_count": onehot.sum(0)}

    def summarize(self, totals: dict[str, np.ndarray]) -> dict[str, Any]:
        n = int(round(float(totals["count"])))
        accuracy = float(totals["correct"]) / n
        names = getattr(self, "class_names", None)
        class_count = np.asarray(totals["class_count"])
        per_class = {
            (names[k] if names else str(k)): float(totals["class_correct"][k] / class_count[k])
            for k in range(len(class_count)) if class_count[k] > 0}
        return {"test_error_pct": 100.0 * (1.0 - accuracy), "test_accuracy": accuracy,
                "test_loss": float(totals["loss"]) / n, "num_test": n,
                "test_accuracy_per_class": per_class}

    def picture(self, model, examples, *, title):
        images = jnp.asarray(examples["image"], jnp.float32)

        @nnx.jit
        def run(model, images):
            views = model.transformer_views(images)
            if not views:
                return model(images), None, None
            return (model(images), jnp.stack([v["theta"] for v in views], 1),
                    jnp.stack([v["output"] for v in views], 1))

        logits, thetas, crops = run(model, images)
        names = getattr(self, "class_names", None) or [str(k) for k in range(logits.shape[-1])]
        return render(np.asarray(images), thetas=None if thetas is None else np.asarray(thetas),
                      crops=None if crops is None else np.asarray(crops),
                      labels=examples["label"], predictions=np.asarray(jnp.argmax(logits, -1)),
                      class_names=[n.split(".", 1)[-1][:22] for n in names], title=title)

    def describe(self, dataset, model):
        m = self.config.model
        kind = "CNN" if m.num_st == 0 else f"{m.num_st}xST-CNN"
        return (f"{kind} ({m.backbone}, weights {getattr(self, 'weights_file', '?')}) on CUB "
                f"({dataset.source}, {dataset.num_train} train / {dataset.num_test} test images, "
                f"{dataset.num_classes} classes, {self.config.data.size} px), "
                f"{count_params(model)} params")


TASK = CubTask

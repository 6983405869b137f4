"""Distorted-MNIST batches for the training loop: a pure function of (seed, step, batch_size).

    ds = DistortedMNIST(config.data, seed=config.seed)
    batch = ds.train_batch(step, batch_size)   # {"image": (B, H, W, 1) float32, "label": (B,)}
    test = ds.test_set                         # generated once, from data_config.test_seed

Determinism. Training examples are read as one endless stream: epoch e is the permutation
``jax.random.permutation(fold_in(perm_key, e), num_train)``, and the batch of `step` is
positions ``[step * B, (step + 1) * B)`` of the stream (a batch may straddle two epochs). Its
distortions come from ``fold_in(distort_key, step)``. So a run resumed at any step sees exactly
the data of an uninterrupted one, and two instances with the same seed agree batch for batch.
Distortions are re-drawn every time a digit is seen (each epoch) unless
``data_config.fixed_train``: then one distorted training set is generated once (seeded) and
stored as uint8 (rounded to 1/255, like MNIST itself, to keep 60k 60x60 images at 216 MB).

The test set is generated once, in chunks of 1,000 digits with progress logging, from
``data_config.test_seed`` alone: every run seed is evaluated on the same test images.
TC clutter crops come from other digits of the same split (train crops from train digits,
test from test), never from the digit itself.

Fields of ``data_config`` (an ml_collections ConfigDict or a dict; see `default_data_config`):
source, tfds_dir, idx_dir, distortion, fixed_train, test_seed, bundled_test_fraction,
num_train, num_test, canvas, rotation_deg, scale_min, scale_max, corner_std_px,
control_std_px, control_grid_size, clutter_count, clutter_size.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Iterator

from absl import logging
import jax
import numpy as np

from stn_jax.data import batching
from stn_jax.data import distortions
from stn_jax.data import mnist

NUM_CLASSES = 10

# Every field of data_config besides the distortion's own settings (those come from
# distortions.PAPER_SETTINGS, the one place the paper's numbers are written).
_SOURCE_DEFAULTS = {
    "source": "auto",  # "auto" | "tfds" | "idx" | "bundled" (stn_jax.data.mnist)
    "tfds_dir": "",  # TFDS data_dir; "" = TFDS default
    "idx_dir": "",  # directory of the 4 IDX files for source="idx"
    "distortion": "R",  # "R" | "RTS" | "P" | "E" | "TC"
    "fixed_train": False,  # True: one fixed distorted training set instead of fresh draws
    "test_seed": 0,  # seed of the (always fixed) distorted test set
    "bundled_test_fraction": 0.2,  # bundled source: share of each class held out as test
    "num_train": -1,  # -1 = all training digits; n > 0 = a fixed subset of n
    "num_test": -1,  # -1 = all test digits; n > 0 = a fixed subset of n
}
_COMMON_DEFAULTS = {**_SOURCE_DEFAULTS, **distortions.PAPER_SETTINGS["R"]}
DATA_FIELDS = tuple(_COMMON_DEFAULTS)

# Which data_config fields each generator takes as keyword arguments.
_GENERATOR_FIELDS = {
    "R": ("canvas", "rotation_deg", "scale_min", "scale_max"),
    "RTS": ("canvas", "rotation_deg", "scale_min", "scale_max"),
    "P": ("canvas", "scale_min", "scale_max", "corner_std_px"),
    "E": ("canvas", "scale_min", "scale_max", "control_std_px", "control_grid_size"),
    "TC": ("canvas", "clutter_size", "scale_min", "scale_max", "clutter_combine"),
}
# data_config fields whose generator keyword has another name.
_GENERATOR_KEYWORDS = {"clutter_combine": "combine"}

_CHUNK = 1000  # digits per generation chunk (part of the fixed sets' definition)


def default_data_config(distortion: str) -> dict[str, Any]:
    """The default data_config fields for a distortion, as a plain dict.

    Example:
      >>> default_data_config("RTS")["canvas"], default_data_config("RTS")["scale_max"]
      (42, 1.2)
    """
    if distortion not in distortions.PAPER_SETTINGS:
        raise ValueError(
            f"distortion must be one of {distortions.DISTORTIONS}, got {distortion!r}"
        )
    return {**_SOURCE_DEFAULTS, **distortions.PAPER_SETTINGS[distortion],
            "distortion": distortion}


def _read_config(data_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Validates data_config; missing fields take the distortion's defaults."""
    given = dict(data_config.items()) if hasattr(data_config, "items") else dict(data_config)
    unknown = sorted(set(given) - set(DATA_FIELDS))
    if unknown:
        raise ValueError(f"data_config: unknown fields {unknown}; known fields: {DATA_FIELDS}")
    distortion = given.get("distortion", _COMMON_DEFAULTS["distortion"])
    cfg = {**default_data_config(distortion), **given}
    if cfg["source"] not in mnist.SOURCES:
        raise ValueError(
            f"data_config.source must be one of {mnist.SOURCES}, got {cfg['source']!r}"
        )
    for name in ("num_train", "num_test"):
        if not (cfg[name] == -1 or cfg[name] >= 1):
            raise ValueError(f"data_config.{name} must be -1 (all) or >= 1, got {cfg[name]}")
    for name in ("canvas", "control_grid_size", "clutter_count", "clutter_size", "test_seed"):
        cfg[name] = int(cfg[name])
    for name in ("rotation_deg", "scale_min", "scale_max", "corner_std_px", "control_std_px"):
        cfg[name] = float(cfg[name])
    if cfg["clutter_count"] < 1:
        raise ValueError(f"data_config.clutter_count must be >= 1, got {cfg['clutter_count']}")
    if cfg["clutter_combine"] not in distortions.COMBINE_MODES:
        raise ValueError(f"data_config.clutter_combine must be one of {distortions.COMBINE_MODES}, "
                         f"got {cfg['clutter_combine']!r}")
    return cfg


def check_data_config(data_config: Mapping[str, Any] | Any) -> None:
    """Raises ValueError naming the field for a bad data_config, without loading any data."""
    _read_config(data_config)


def _subset(n_total: int, n_wanted: int, name: str) -> np.ndarray:
    """A fixed subset (the same for every run seed) of n_wanted of range(n_total), sorted."""
    if n_wanted == -1:
        return np.arange(n_total)
    if n_wanted > n_total:
        raise ValueError(f"data_config.{name}={n_wanted} exceeds the {n_total} digits available")
    return np.sort(np.random.default_rng(0).permutation(n_total)[:n_wanted])


def _as_float(images_u8: np.ndarray) -> np.ndarray:
    return (images_u8.astype(np.float32) / 255.0)[..., None]


class DistortedMNIST:
    """Distorted MNIST (R, RTS, P, E or TC) for training and evaluation.

    Attributes:
      source: MNIST source actually used ("tfds", "idx" or "bundled").
      image_shape: (H, W, C) of the images, (canvas, canvas, 1).
      num_classes: 10.
      num_train: number of training digits.
      num_test: number of test digits.

    Example:
      >>> ds = DistortedMNIST(default_data_config("RTS") | {"source": "bundled"}, seed=0)
      >>> batch = ds.train_batch(0, 256)
      >>> batch["image"].shape, batch["label"].shape
      ((256, 42, 42, 1), (256,))
    """

    num_classes = NUM_CLASSES

    def __init__(self, data_config: Mapping[str, Any] | Any, *, seed: int):
        self.config = _read_config(data_config)
        cfg = self.config
        data = mnist.load_mnist(
            source=cfg["source"],
            tfds_dir=cfg["tfds_dir"],
            idx_dir=cfg["idx_dir"],
            bundled_test_fraction=cfg["bundled_test_fraction"],
        )
        self.source = data.source
        train = _subset(data.train_images.shape[0], cfg["num_train"], "num_train")
        test = _subset(data.test_images.shape[0], cfg["num_test"], "num_test")
        self._train_images, self._train_labels = data.train_images[train], data.train_labels[train]
        self._test_images, self._test_labels = data.test_images[test], data.test_labels[test]
        self.num_train = int(train.size)
        self.num_test = int(test.size)
        if cfg["distortion"] == "TC" and min(self.num_train, self.num_test) < 2:
            raise ValueError("distortion TC needs >= 2 digits per split (clutter from others)")
        self.image_shape = (cfg["canvas"], cfg["canvas"], 1)
        self._generator = distortions.distortion_fn(cfg["distortion"])
        self._kwargs = {_GENERATOR_KEYWORDS.get(name, name): cfg[name]
                        for name in _GENERATOR_FIELDS[cfg["distortion"]]}
        root = jax.random.key(seed)
        self._perm_key = jax.random.fold_in(root, 0)
        self._distort_key = jax.random.fold_in(root, 1)
        self._fixed_key = jax.random.fold_in(root, 2)
        self._test_key = jax.random.key(cfg["test_seed"])
        self._permutations: dict[int, np.ndarray] = {}
        logging.info(
            "DistortedMNIST: %s, source=%s, %d train / %d test digits, image %s, fixed_train=%s",
            cfg["distortion"],
            self.source,
            self.num_train,
            self.num_test,
            self.image_shape,
            cfg["fixed_train"],
        )

    # ------------------------------------------------------------------------- generation

    def _distort(self, key: jax.Array, index: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """Distorts pool[index] (uint8 digits) with one key; returns float32 (B, H, W, 1)."""
        digits = _as_float(pool[index])
        k_clutter, k_distort = jax.random.split(key)
        if self.config["distortion"] == "TC":
            n = pool.shape[0]
            shift = jax.random.randint(k_clutter, (index.size, self.config["clutter_count"]), 1, n)
            others = (index[:, None] + np.asarray(shift)) % n  # never the digit itself
            images, _ = self._generator(k_distort, digits, _as_float(pool[others]), **self._kwargs)
        else:
            images, _ = self._generator(k_distort, digits, **self._kwargs)
        return np.asarray(images, np.float32)

    def _generate(self, key: jax.Array, pool: np.ndarray, what: str) -> np.ndarray:
        """Distorts every digit of pool once, in fixed chunks; uint8 or float32 result."""
        n = pool.shape[0]
        chunk = min(_CHUNK, n)
        out = np.empty((n,) + self.image_shape, np.float32)
        for c, start in enumerate(range(0, n, chunk)):
            index = np.arange(start, start + chunk) % n  # pad the last chunk: one compile
            images = self._distort(jax.random.fold_in(key, c), index, pool)
            stop = min(start + chunk, n)
            out[start:stop] = images[: stop - start]
            logging.log_every_n_seconds(
                logging.INFO, "Generating %s: %d / %d digits", 10, what, stop, n
            )
        logging.info("Generated %s: %d digits, %s", what, n, self.config["distortion"])
        return out

    @functools.cached_property
    def test_set(self) -> dict[str, np.ndarray]:
        """The distorted test set: {"image": float32 (N, H, W, 1), "label": int32 (N,)}.

        Generated once (on first use) from data_config.test_seed only.
        """
        images = self._generate(self._test_key, self._test_images, "test set")
        return {"image": images, "label": self._test_labels.copy()}

    @functools.cached_property
    def _fixed_train(self) -> np.ndarray:
        images = self._generate(self._fixed_key, self._train_images, "fixed training set")
        return np.round(images * 255.0).astype(np.uint8)

    # ------------------------------------------------------------------------- batches

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            key = jax.random.fold_in(self._perm_key, epoch)
            self._permutations[epoch] = np.asarray(jax.random.permutation(key, self.num_train))
        return self._permutations[epoch]

    def train_indices(self, step: int, batch_size: int) -> np.ndarray:
        """Indices (into the training digits) of the batch of `step`; see the module docstring."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        positions = int(step) * int(batch_size) + np.arange(batch_size)
        epochs = positions // self.num_train
        index = np.empty(batch_size, np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            index[here] = self._permutation(int(epoch))[positions[here] % self.num_train]
        return index

    def train_batch(self, step: int, batch_size: int, *, sharding=None) -> dict:
        """The training batch of `step`: a pure function of (seed, step, batch_size).

        Args:
          step, batch_size: which batch (see the module docstring).
          sharding: None: the whole batch as host numpy arrays. A batch sharding (the training
            loop's): the global batch as jax.Arrays; this process gathers only its own rows of
            raw uint8 digits and the distortions run on its devices (no image crosses the
            host), with the same values as the host path.

        Returns:
          {"image": float32 (batch_size, H, W, 1) in [0, 1], "label": int32 (batch_size,)}.
        """
        if sharding is not None:
            return self._device_batch(step, batch_size, sharding)
        index = self.train_indices(step, batch_size)
        if self.config["fixed_train"]:
            images = self._fixed_train[index].astype(np.float32) / 255.0
        else:
            key = jax.random.fold_in(self._distort_key, step)
            images = self._distort(key, index, self._train_images)
        return {"image": images, "label": self._train_labels[index]}

    def _device_batch(self, step: int, batch_size: int, sharding) -> dict:
        index = self.train_indices(step, batch_size)
        rows = batching.local_rows(sharding, batch_size)
        local = {"label": self._train_labels[index[rows]]}
        if self.config["fixed_train"]:
            local["pixels"] = self._fixed_train[index[rows]]
            key = None
        else:
            key = jax.random.fold_in(self._distort_key, step)
            local["pixels"] = self._train_images[index[rows]]
            if self.config["distortion"] == "TC":
                local["others"] = self._train_images[self._clutter_index(key, index)[rows]]
        batch = batching.assemble(local, sharding, batch_size)
        images = self._on_device(sharding)(key, batch["pixels"], batch.get("others"))
        # The generator keeps the batch split, but on one device XLA calls it replicated (the
        # same placement); say the batch sharding so the step's input matches it exactly.
        return {"image": jax.device_put(images, sharding), "label": batch["label"]}

    def _clutter_index(self, key: jax.Array, index: np.ndarray) -> np.ndarray:
        """(B, clutter_count) indices of the digits whose crops clutter each digit (never
        the digit itself); the same draw as the host path's."""
        n = self._train_images.shape[0]
        k_clutter, _ = jax.random.split(key)
        shift = jax.random.randint(k_clutter, (index.size, self.config["clutter_count"]), 1, n)
        return (index[:, None] + np.asarray(shift)) % n

    def _on_device(self, sharding):
        """uint8 pixels (sharded) -> distorted float32 images with the same sharding.

        The values are the host path's to the bit: the conversion reads a table of the 256
        values numpy computes (XLA's x / 255 rounds some pixels 1 ulp differently, which
        changed every run's trajectory), and the generator runs as its own program, the very
        one the host path runs."""
        cache = self.__dict__.setdefault("_device_fns", {})
        if sharding not in cache:
            table = np.arange(256, dtype=np.float32) / 255.0  # == uint8.astype(f32) / 255.0
            cache[sharding] = jax.jit(lambda x: jax.numpy.asarray(table)[x],
                                      out_shardings=sharding)
        to_float = cache[sharding]

        def generate(key, pixels, others):
            images = to_float(pixels)
            if key is None:  # fixed_train: already distorted.
                return images
            _, k_distort = jax.random.split(key)
            if others is None:
                return self._generator(k_distort, images[..., None], **self._kwargs)[0]
            return self._generator(k_distort, images[..., None], to_float(others)[..., None],
                                   **self._kwargs)[0]

        return generate

    def test_batches(self, batch_size: int, *, sharding) -> Iterator[dict]:
        """The test set once, as global padded batches with a "mask" (see `batching`)."""
        test = self.test_set
        rows = batching.local_rows(sharding, batch_size)
        for start in range(0, self.num_test, batch_size):
            chunk = {name: test[name][start:start + batch_size] for name in ("image", "label")}
            padded = batching.pad_batch(chunk, batch_size)
            yield batching.assemble({k: v[rows] for k, v in padded.items()}, sharding,
                                    batch_size)

    def picture_examples(self, count: int) -> dict[str, np.ndarray]:
        """`count` test examples spread evenly over the test set (the same every time)."""
        n = self.num_test
        index = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
        return {"image": self.test_set["image"][index], "label": self.test_set["label"][index]}

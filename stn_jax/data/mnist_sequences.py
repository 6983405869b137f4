"""House-number-like images from real MNIST digits: an offline stand-in for SVHN on a CPU.

`render_numbers` (jitted, a pure function of its key) lays 1-5 digits side by side with random
spacing, scale, rotation and vertical jitter, colours them on a textured background, and frames
the number as SVHN format 1 is framed (`stn_jax.data.svhn`): size 64 maps the number's box
grown by 30% onto the whole image (stretched, as the SVHN crops are); size 128 maps a frame
twice that large, so the number sits small in the middle with background around it. Labels are
SVHN's (B, 5): digit slots from the left, `BLANK` (10) after the number's end.

Geometry, in "number pixels" (the MNIST digit's own pixels, digit frame 28, ink about 20 high):
digit i has scale s_i, rotation r_i (counter-clockwise as displayed) and centre (x_i, y_i); its
ink box is taken as the central 20x20 of its frame scaled by s_i (MNIST digits are drawn into a
20x20 box centred in 28x28), its advance width 16 s_i, and the gap to the next digit is drawn
from `gap` (times 20). Each digit is sampled into the canvas with `stn_jax.affine_grid` and
`stn_jax.bilinear_sample` (zero padding), so the generator is exactly an affine spatial
transformer per digit. Every range here is a choice [?]: the paper has no such data set.

Example:
    >>> digits = jnp.zeros((4, 5, 28, 28))           # uint8 or float MNIST digits, 5 per number
    >>> images, params = render_numbers(jax.random.key(0), digits, jnp.array([1, 2, 3, 5]))
    >>> images.shape, params["ink"].shape
    ((4, 64, 64, 3), (4, 64, 64, 1))
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

import stn_jax
from stn_jax.data import batching
from stn_jax.data import mnist
from stn_jax.data.svhn import BLANK, EXPAND, LOOSE_FRAME_SCALE, MAX_DIGITS, SIZES

_INK_HALF = 10.0  # Half the side of MNIST's 20x20 ink box, digit pixels.
_ADVANCE = 16.0  # Advance width of a digit at scale 1, digit pixels [?].
_CHUNK = 500  # Test images generated per call (part of the fixed test set's definition).


def _rotation_inverse(angle_rad: jax.Array) -> jax.Array:
    """(..., 2, 2) inverse of a counter-clockwise (as displayed, y down) rotation."""
    cos, sin = jnp.cos(angle_rad), jnp.sin(angle_rad)
    return jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)


@functools.partial(jax.jit, static_argnames=(
    "size", "rotation_deg", "scale", "gap", "jitter", "frame_jitter", "textured"))
def render_numbers(
    key: jax.Array,
    digits: ArrayLike,
    lengths: ArrayLike,
    *,
    size: int = 64,
    rotation_deg: float = 12.0,
    scale: tuple[float, float] = (0.85, 1.15),
    gap: tuple[float, float] = (-0.05, 0.35),
    jitter: float = 0.1,
    frame_jitter: float = 0.08,
    textured: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Renders numbers made of `digits[:, :lengths]` as SVHN-like RGB images.

    Args:
        key: PRNG key; the images are a pure function of it and the inputs.
        digits: (B, 5, 28, 28) MNIST digits, uint8 (0-255) or float in [0, 1]; slots at and
            past a number's length are ignored.
        lengths: (B,) ints in [1, 5].
        size: 64 (the number's box grown by 30% fills the image) or 128 (a frame twice that).
        rotation_deg: each digit turns by U[-rotation_deg, rotation_deg] degrees.
        scale: range of each digit's scale.
        gap: range of the gap between neighbours, in units of the 20-pixel ink height.
        jitter: each digit moves up or down by U[-jitter, jitter] ink heights.
        frame_jitter: the frame's centre moves by U[-f, f] of its half-size per axis and its
            half-sizes scale by U[1 - f, 1 + f] (real SVHN boxes are not exact either).
        textured: False draws white digits on black (for tests of the geometry).

    Returns:
        images (B, size, size, 3) float32 in [0, 1]; params {"ink": (B, size, size, 1) the
        digits' coverage, "theta": (B, 5, 2, 3) each slot's canvas -> digit affine map
        (normalised coordinates, align_corners=False)}.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    digits = jnp.asarray(digits)
    if digits.ndim != 4 or digits.shape[1] != MAX_DIGITS:
        raise ValueError(f"digits must have shape (B, {MAX_DIGITS}, H, W), got {digits.shape}")
    if jnp.issubdtype(digits.dtype, jnp.integer):
        digits = digits.astype(jnp.float32) / 255.0
    batch, _, dh, dw = digits.shape
    lengths = jnp.asarray(lengths, jnp.int32)
    keys = jax.random.split(key, 8)
    u = lambda k, shape, lo, hi: jax.random.uniform(k, shape, jnp.float32, lo, hi)  # noqa: E731

    s = u(keys[0], (batch, MAX_DIGITS), *scale)
    angle = jnp.deg2rad(u(keys[1], (batch, MAX_DIGITS), -rotation_deg, rotation_deg))
    gaps = 2 * _INK_HALF * u(keys[2], (batch, MAX_DIGITS), *gap)
    y = 2 * _INK_HALF * u(keys[3], (batch, MAX_DIGITS), -jitter, jitter)
    advance = _ADVANCE * s
    # Centre of digit i: half of digit 0, then (advance_{j-1} + advance_j) / 2 + gap_j.
    step = jnp.concatenate([jnp.zeros((batch, 1)), (advance[:, :-1] + advance[:, 1:]) / 2
                            + gaps[:, 1:]], axis=1)
    x = jnp.cumsum(step, axis=1)
    active = jnp.arange(MAX_DIGITS)[None] < lengths[:, None]
    big = jnp.float32(1e6)
    half = _INK_HALF * s
    left = jnp.min(jnp.where(active, x - half, big), 1)
    right = jnp.max(jnp.where(active, x + half, -big), 1)
    top = jnp.min(jnp.where(active, y - half, big), 1)
    bottom = jnp.max(jnp.where(active, y + half, -big), 1)

    grow = (1.0 + EXPAND) * (LOOSE_FRAME_SCALE if size == 128 else 1.0)
    half_frame = jnp.stack([right - left, bottom - top], -1) / 2 * grow
    half_frame = half_frame * u(keys[4], (batch, 2), 1 - frame_jitter, 1 + frame_jitter)
    centre = jnp.stack([left + right, top + bottom], -1) / 2
    centre = centre + half_frame * u(keys[5], (batch, 2), -frame_jitter, frame_jitter)

    # Canvas normalised u -> number point c + half_frame * u -> digit i's centred pixels
    # R_i^-1 (point - t_i) / s_i -> digit normalised (divide by half the digit's size).
    rot = _rotation_inverse(angle) / s[..., None, None]  # (B, 5, 2, 2)
    to_norm = jnp.array([2.0 / dw, 2.0 / dh], jnp.float32)[:, None]
    linear = to_norm * rot * half_frame[:, None, None, :]
    t = jnp.stack([x, y], -1)
    offset = jnp.einsum("bkij,bkj->bki", rot, centre[:, None] - t) * to_norm[:, 0]
    theta = jnp.concatenate([linear, offset[..., None]], -1)  # (B, 5, 2, 3)
    grid = stn_jax.affine_grid(theta.reshape(batch * MAX_DIGITS, 2, 3), (size, size))
    layers = stn_jax.bilinear_sample(digits.reshape(batch * MAX_DIGITS, dh, dw, 1), grid)
    layers = layers.reshape(batch, MAX_DIGITS, size, size, 1)
    ink = jnp.max(jnp.where(active[:, :, None, None, None], layers, 0.0), axis=1)
    ink = jnp.clip(ink, 0.0, 1.0)
    if not textured:
        return jnp.repeat(ink, 3, -1), {"ink": ink, "theta": theta}

    # Background: a colour, a smooth random texture and fine noise; digits in a colour
    # that contrasts with the background's brightness.
    bg = u(keys[6], (batch, 1, 1, 3), 0.0, 1.0)
    k_tex, k_noise, k_fg, k_shift = jax.random.split(keys[7], 4)
    coarse = 0.15 * jax.random.normal(k_tex, (batch, 4, 4, 3))
    texture = jax.image.resize(coarse, (batch, size, size, 3), "bilinear")
    background = bg + texture + 0.04 * jax.random.normal(k_noise, (batch, size, size, 3))
    brightness = jnp.mean(bg, axis=-1, keepdims=True)
    shift = u(k_shift, (batch, 1, 1, 1), 0.35, 0.7) * jnp.where(brightness > 0.5, -1.0, 1.0)
    fg = jnp.clip(bg + shift + 0.15 * jax.random.normal(k_fg, (batch, 1, 1, 3)), 0.0, 1.0)
    images = jnp.clip(background * (1.0 - ink) + fg * ink, 0.0, 1.0)
    return images, {"ink": ink, "theta": theta}


def draw_numbers(rng: np.random.Generator, pool_labels: np.ndarray, count: int,
                 *, max_length: int = MAX_DIGITS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws `count` numbers: (digit indices (count, 5), lengths (count,), labels (count, 5)).

    Lengths are uniform in [1, max_length] [?]; each slot's digit is uniform over the pool; the
    labels hold `BLANK` past each number's length.

    Example:
        >>> index, lengths, labels = draw_numbers(np.random.default_rng(0), np.arange(10), 2)
        >>> labels.shape, bool(np.all(labels[np.arange(5) >= lengths[:, None]] == 10))
        ((2, 5), True)
    """
    if not 1 <= max_length <= MAX_DIGITS:
        raise ValueError(f"max_length must be in [1, {MAX_DIGITS}], got {max_length!r}")
    index = rng.integers(0, len(pool_labels), size=(count, MAX_DIGITS))
    lengths = rng.integers(1, max_length + 1, size=count)
    labels = np.where(np.arange(MAX_DIGITS)[None] < lengths[:, None], pool_labels[index], BLANK)
    return index, lengths.astype(np.int32), labels.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("crop",))
def _random_crops(key, images, *, crop):
    n, s = images.shape[:2]
    offsets = jax.random.randint(key, (n, 2), 0, s - crop + 1)
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(
        im, (o[1], o[0], 0), (crop, crop, im.shape[-1])))(images, offsets)


class MnistSequencesDataset:
    """`render_numbers` as a training set (fresh images every step) and a fixed test set.

    Digits come from the bundled real MNIST digits (`stn_jax.data.mnist.load_bundled`: 4000
    train / 1000 test digits); test numbers use only test digits. The batch of `step` is a pure
    function of (seed, step): the host draws the digit indices and lengths of the global batch
    (`draw_numbers`), each process gathers its rows and the images are rendered on the devices
    with the batch sharding. With `crop` < `size`, training images are random crops and test
    images centre crops. `max_length` < 5 draws shorter numbers (an easier task, for tests).

    Example:
        >>> ds = MnistSequencesDataset(size=64, seed=0, num_test=1000)
        >>> ds.train_batch(0, 128, sharding=sharding)["image"].shape
        (128, 64, 64, 3)
    """

    source = "mnist_sequences"

    def __init__(self, *, size: int = 64, seed: int = 0, num_test: int = 2000,
                 test_seed: int = 0, crop: int = 0, random_crop: bool = False,
                 max_length: int = MAX_DIGITS, render_options: dict[str, Any] | None = None):
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        if crop and not 0 < crop <= size:
            raise ValueError(f"crop must be 0 (none) or in [1, {size}], got {crop}")
        if num_test < 1:
            raise ValueError(f"num_test must be >= 1, got {num_test}")
        data = mnist.load_bundled()
        self._train_digits, self._train_labels = data.train_images, data.train_labels
        self._test_digits, self._test_labels = data.test_images, data.test_labels
        self.size, self.crop, self.random_crop = size, crop or size, random_crop
        self.image_shape = (self.crop, self.crop, 3)
        self.num_train = len(self._train_labels)  # Distinct digits; numbers are endless.
        self.num_test = num_test
        self._seed, self._test_seed = seed, test_seed
        draw_numbers(np.random.default_rng(0), np.arange(1), 1, max_length=max_length)  # checks
        self._max_length = max_length
        self._options = dict(render_options or {})
        self._render = functools.partial(render_numbers, size=size, **self._options)
        self._renderers: dict[Any, Any] = {}
        logging.info("mnist_sequences: %d px, %d train / %d test digits, %d test numbers",
                     size, self.num_train, len(self._test_labels), num_test)

    def _draw(self, seed: tuple[int, ...], pool_labels, count):
        return draw_numbers(np.random.default_rng(list(seed)), pool_labels, count,
                            max_length=self._max_length)

    def _finish(self, key, images, train: bool):
        if self.crop == self.size:
            return images
        if train and self.random_crop:
            return _random_crops(key, images, crop=self.crop)
        start = (self.size - self.crop) // 2
        return images[:, start:start + self.crop, start:start + self.crop]

    def train_batch(self, step: int, batch_size: int, *, sharding) -> dict[str, jax.Array]:
        rows = batching.local_rows(sharding, batch_size)
        index, lengths, labels = self._draw((self._seed, 1, int(step)), self._train_labels,
                                            batch_size)
        local = {"digits": self._train_digits[index[rows]], "lengths": lengths[rows],
                 "label": labels[rows]}
        batch = batching.assemble(local, sharding, batch_size)
        key = jax.random.fold_in(jax.random.key(self._seed), int(step))
        if sharding not in self._renderers:  # One compilation per sharding.
            self._renderers[sharding] = jax.jit(self._render_train, out_shardings=sharding)
        images = self._renderers[sharding](key, batch["digits"], batch["lengths"])
        return {"image": images, "label": batch["label"]}

    def _render_train(self, key, digits, lengths):
        images, _ = self._render(key, digits, lengths)
        return self._finish(jax.random.fold_in(key, 1), images, True)

    @functools.cached_property
    def _test_set(self) -> dict[str, np.ndarray]:
        index, lengths, labels = self._draw((self._test_seed, 2), self._test_labels,
                                            self.num_test)
        images = np.empty((self.num_test,) + self.image_shape, np.uint8)
        key = jax.random.key(self._test_seed)
        for c, start in enumerate(range(0, self.num_test, _CHUNK)):
            rows = np.arange(start, start + _CHUNK) % self.num_test  # one compiled shape
            out, _ = self._render(jax.random.fold_in(key, c), self._test_digits[index[rows]],
                                  lengths[rows])
            out = np.asarray(self._finish(None, out, False))
            stop = min(start + _CHUNK, self.num_test)
            images[start:stop] = np.round(out[: stop - start] * 255.0).astype(np.uint8)
        return {"image": images, "label": labels}

    def _test_examples(self, index: np.ndarray) -> dict[str, np.ndarray]:
        test = self._test_set
        return {"image": test["image"][index].astype(np.float32) / 255.0,
                "label": test["label"][index]}

    def test_batches(self, batch_size: int, *, sharding) -> Iterator[dict[str, jax.Array]]:
        rows = batching.local_rows(sharding, batch_size)
        for start in range(0, self.num_test, batch_size):
            index = np.arange(start, min(start + batch_size, self.num_test))
            padded = batching.pad_batch(self._test_examples(index), batch_size)
            yield batching.assemble({k: v[rows] for k, v in padded.items()}, sharding,
                                    batch_size)

    def picture_examples(self, count: int) -> dict[str, np.ndarray]:
        return self._test_examples(np.arange(min(count, self.num_test)))

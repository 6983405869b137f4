"""Table-2 models for SVHN multi-digit recognition (Sect. 4.2): CNN, ST-CNN Single and Multi.

Every model returns logits (B, 5, 11): five independent softmax heads, one per digit position,
over the digits 0-9 and "no digit" (10) [P].

- CNN, the baseline of Goodfellow et al. (2014) as commonly read [S]: eight 5x5 convolutions
  with 48, 64, 128, 160, 192, 192, 192, 192 filters, "same" padding and ReLU, each followed by
  a 2x2 max-pool whose stride alternates 2, 1, 2, 1, ... (so the map halves on alternate
  layers: 64 -> 4, 54 -> 4, 128 -> 8), then FC 3072, FC 3072 and the five heads (one
  3072 x 55 layer: the same parameters as five 3072 x 11 heads). Goodfellow's eleventh hidden
  layer is a locally connected one that this reading, like the paper's description, leaves out.
  Dropout (rate 0.5 [S]) follows every hidden layer but the first convolution.
- ST-CNN Single: an affine spatial transformer on the input (output the input's size), whose
  localisation net is conv 32 5x5 -> max-pool 2 -> conv 32 5x5 -> FC 32 -> FC 32 [P: four
  layers; S: the sizes], ReLU, "same" padding, then the CNN.
- ST-CNN Multi: an affine spatial transformer before each of the first four convolutions [P],
  each with a localisation net FC 32 -> FC 32 [P] on its flattened input; the deeper three warp
  feature maps (48, 64 and 128 channels).

Localisation nets have no dropout [S]; every regression layer starts at zero weights and the
identity bias (`stn_jax.SpatialTransformer`), so every model is the CNN at initialisation.
`batch_norm=True` [?: not in the paper] puts batch norm after every convolution and FC layer of
the classifier (statistics in `nnx.BatchStat`). Layers start with flax's LeCun-normal default
[?]: He-normal, with dropout's 2x second moment on nine layers, put training logits in the
hundreds at step 0.

`width` [?: not in the paper; 1 is the paper's model] multiplies the classifier's filters and
FC units (rounded, at least 1) so that a CPU can train the same architecture smaller
(`runlocal`); the localisation nets keep their sizes. `param_count` is the closed form; tests
check it against the built models.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import stn_jax
from stn_jax.models import count_params  # noqa: F401  (re-exported: svhn.count_params)
from stn_jax.models.layers import max_pool_2x2
from stn_jax.transformer import SpatialTransformer

MODEL_NAMES = ("cnn", "st_single", "st_multi")
CONV_FILTERS = (48, 64, 128, 160, 192, 192, 192, 192)  # [S]
POOL_STRIDES = (2, 1, 2, 1, 2, 1, 2, 1)  # [S] Goodfellow et al.: alternating 2 and 1.
KERNEL = 5  # [S]
FC_UNITS = 3072  # [S]
NUM_POSITIONS = 5  # [P]
NUM_CLASSES = 11  # [P] Ten digits and "no digit".
LOC_CONV_FILTERS = 32  # [S] ST-CNN Single's localisation convolutions.
LOC_FC_UNITS = 32  # [P] Multi; [S] Single.
MULTI_TRANSFORMERS = 4  # [P] Before each of the first four convolutions.
_IDENTITY_THETA_SIZE = 6  # An affine transform's parameters.


# ---------------------------------------------------------------- shapes and closed-form counts


def _pooled(size: int, stride: int) -> int:
    return -(-size // stride)


def _scaled(units: int, width: float) -> int:
    return max(1, int(round(units * width)))


def _check_width(width: float) -> float:
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}")
    return float(width)


def conv_filters(width: float = 1.0) -> tuple[int, ...]:
    """The eight convolutions' filters at `width` (1: 48, 64, 128, 160, 192, 192, 192, 192)."""
    return tuple(_scaled(f, _check_width(width)) for f in CONV_FILTERS)


def conv_input_shapes(input_shape: Sequence[int],
                      width: float = 1.0) -> list[tuple[int, int, int]]:
    """(H, W, C) at the input of each of the eight convolutions, then after the last pool.

    Example:
        >>> conv_input_shapes((64, 64, 3))[-1]
        (4, 4, 192)
    """
    h, w, c = _check_input_shape(input_shape)
    shapes = [(h, w, c)]
    for filters, stride in zip(conv_filters(width), POOL_STRIDES):
        h, w, c = _pooled(h, stride), _pooled(w, stride), filters
        shapes.append((h, w, c))
    return shapes


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be (H, W, C) positive ints, got {input_shape!r}")
    return shape


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _conv(n_in: int, n_out: int, k: int = KERNEL) -> int:
    return k * k * n_in * n_out + n_out


def param_count(name: str, *, input_shape: Sequence[int], batch_norm: bool = False,
                width: float = 1.0) -> int:
    """Exact number of trainable parameters of `create_model(name, ...)`, without building it.

    Example:
        >>> param_count("cnn", input_shape=(64, 64, 3)) - param_count("cnn", input_shape=(54, 54, 3))
        0
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    shapes = conv_input_shapes(input_shape, width)
    units = _scaled(FC_UNITS, width)
    bn = 2 if batch_norm else 0  # scale and bias per channel
    total = sum(_conv(c, f) + bn * f for (_, _, c), f in zip(shapes, conv_filters(width)))
    fh, fw, fc = shapes[-1]
    total += _linear(fh * fw * fc, units) + _linear(units, units) + 2 * bn * units
    total += _linear(units, NUM_POSITIONS * NUM_CLASSES)
    regression = _linear(LOC_FC_UNITS, _IDENTITY_THETA_SIZE)
    if name == "st_single":
        h, w, c = shapes[0]
        total += (_conv(c, LOC_CONV_FILTERS) + _conv(LOC_CONV_FILTERS, LOC_CONV_FILTERS)
                  + _linear(_pooled(h, 2) * _pooled(w, 2) * LOC_CONV_FILTERS, LOC_FC_UNITS)
                  + _linear(LOC_FC_UNITS, LOC_FC_UNITS) + regression)
    elif name == "st_multi":
        for h, w, c in shapes[:MULTI_TRANSFORMERS]:
            total += _linear(h * w * c, LOC_FC_UNITS) + _linear(LOC_FC_UNITS, LOC_FC_UNITS)
            total += regression
    return total


# ---------------------------------------------------------------------------------- modules


def _same_conv(n_in: int, n_out: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    # XLA's own convolution, also on the CPU: with these few input channels (3-32 at the runlocal
    # width 1/8) the im2col form of layers.py, which wins for the MNIST CNN's 88-channel 7x7 conv,
    # made the runlocal train step 3.6x slower, 1.9x at width 1/4 (docs/performance.md,
    # "SVHN models").
    return nnx.Conv(n_in, n_out, kernel_size=(KERNEL, KERNEL), padding="SAME", rngs=rngs)


def _max_pool(x: jax.Array, stride: int) -> jax.Array:
    if stride == 2:
        return max_pool_2x2(x)  # ceil mode, fast gradient on CPU
    # Stride 1 keeps the size: the window hangs over the bottom/right edge, padded with -inf.
    return nnx.max_pool(x, (2, 2), strides=(1, 1), padding=((0, 1), (0, 1)))


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class ConvBlock(nnx.Module):
    """conv 5x5 (same) -> [batch norm] -> ReLU -> 2x2 max-pool (stride 1 or 2) -> [dropout]."""

    def __init__(self, n_in: int, n_out: int, *, stride: int, dropout: float, batch_norm: bool,
                 rngs: nnx.Rngs):
        self.conv = _same_conv(n_in, n_out, rngs=rngs)
        self.norm = nnx.BatchNorm(n_out, rngs=rngs) if batch_norm else None
        self.dropout = nnx.Dropout(dropout) if dropout else None
        self.stride = stride

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        x = _max_pool(nnx.relu(x), self.stride)
        if self.dropout is not None:
            x = self.dropout(x, rngs=rngs)
        return x


class SingleLocalization(nnx.Module):
    """ST-CNN Single's localisation net: conv 32 -> pool 2 -> conv 32 -> FC 32 -> FC 32."""

    def __init__(self, in_shape: tuple[int, int, int], *, rngs: nnx.Rngs):
        h, w, c = in_shape
        self.conv1 = _same_conv(c, LOC_CONV_FILTERS, rngs=rngs)
        self.conv2 = _same_conv(LOC_CONV_FILTERS, LOC_CONV_FILTERS, rngs=rngs)
        self.fc1 = nnx.Linear(_pooled(h, 2) * _pooled(w, 2) * LOC_CONV_FILTERS, LOC_FC_UNITS,
                              rngs=rngs)
        self.fc2 = nnx.Linear(LOC_FC_UNITS, LOC_FC_UNITS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = max_pool_2x2(nnx.relu(self.conv1(x)))
        x = nnx.relu(self.conv2(x))
        x = nnx.relu(self.fc1(_flatten(x)))
        return nnx.relu(self.fc2(x))


class FCLocalization(nnx.Module):
    """ST-CNN Multi's localisation net: flatten -> FC 32 -> FC 32 (ReLU)."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_features, LOC_FC_UNITS, rngs=rngs)
        self.fc2 = nnx.Linear(LOC_FC_UNITS, LOC_FC_UNITS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.fc2(nnx.relu(self.fc1(_flatten(x)))))


def _transformer(localization, hw: tuple[int, int], *, rngs: nnx.Rngs) -> SpatialTransformer:
    return SpatialTransformer(localization, loc_features=LOC_FC_UNITS, kind="affine",
                              out_shape=hw, rngs=rngs)


class SvhnClassifier(nnx.Module):
    """The CNN with optional spatial transformers; `model(x, rngs=...)` -> logits (B, 5, 11).

    Build it with `create_model`. Attributes: `name`, `input_shape` (H, W, C), `blocks` (the
    eight convolution blocks), `transformers` (an `nnx.List` of the `SpatialTransformer`s and
    the index of the block each one precedes in `transformer_blocks`).
    """

    def __init__(self, name: str, input_shape: Sequence[int], *, dropout: float = 0.5,
                 batch_norm: bool = False, width: float = 1.0, rngs: nnx.Rngs):
        if name not in MODEL_NAMES:
            raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        shapes = conv_input_shapes(input_shape, width)
        units = _scaled(FC_UNITS, width)
        self.name, self.input_shape, self.width = name, shapes[0], width
        self.blocks = nnx.List([
            ConvBlock(c, f, stride=s, dropout=dropout if i else 0.0, batch_norm=batch_norm,
                      rngs=rngs)
            for i, ((_, _, c), f, s) in enumerate(
                zip(shapes, conv_filters(width), POOL_STRIDES))])
        fh, fw, fc = shapes[-1]
        self.fc1 = nnx.Linear(fh * fw * fc, units, rngs=rngs)
        self.fc2 = nnx.Linear(units, units, rngs=rngs)
        self.norm1 = nnx.BatchNorm(units, rngs=rngs) if batch_norm else None
        self.norm2 = nnx.BatchNorm(units, rngs=rngs) if batch_norm else None
        self.dropout = nnx.Dropout(dropout) if dropout else None
        self.heads = nnx.Linear(units, NUM_POSITIONS * NUM_CLASSES, rngs=rngs)
        if name == "st_single":
            h, w, _ = shapes[0]
            self.transformers = nnx.List(
                [_transformer(SingleLocalization(shapes[0], rngs=rngs), (h, w), rngs=rngs)])
            self.transformer_blocks = (0,)
        elif name == "st_multi":
            self.transformers = nnx.List([
                _transformer(FCLocalization(h * w * c, rngs=rngs), (h, w), rngs=rngs)
                for h, w, c in shapes[:MULTI_TRANSFORMERS]])
            self.transformer_blocks = tuple(range(MULTI_TRANSFORMERS))
        else:
            self.transformers = nnx.List([])
            self.transformer_blocks = ()

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")

    def _drop(self, x, rngs):
        return x if self.dropout is None else self.dropout(x, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x (B, H, W, C) float32 -> logits (B, 5, 11). Training mode needs `rngs` (dropout)."""
        self._check_input(x)
        which = dict(zip(self.transformer_blocks, self.transformers))
        for i, block in enumerate(self.blocks):
            if i in which:
                x, _ = which[i](x)
            x = block(x, rngs=rngs)
        x = self.fc1(_flatten(x))
        x = self._drop(nnx.relu(x if self.norm1 is None else self.norm1(x)), rngs)
        x = self.fc2(x)
        x = self._drop(nnx.relu(x if self.norm2 is None else self.norm2(x)), rngs)
        return self.heads(x).reshape(x.shape[0], NUM_POSITIONS, NUM_CLASSES)

    def transformer_views(self, x: jax.Array) -> list[dict[str, jax.Array]]:
        """What each transformer does to x (B, H, W, C), for pictures; call in eval mode.

        Returns:
            One dict per transformer, input side first: "name"; "output" (B, H', W', C') the
            transformer's output (feature maps for the deeper ones of Multi); "grid"
            (B, H', W', 2) its sampling grid composed back onto the input image, normalised
            (x, y) (the affine maps of the transformers before it applied in turn: features
            keep the input's normalised coordinates through "same" convolutions and pools);
            "input_view" (B, H', W', C) the input sampled at that composed grid.
        """
        self._check_input(x)
        image, views = x, []
        composed = None  # (B, 3, 3): this layer's normalised points -> the input's
        which = dict(zip(self.transformer_blocks, self.transformers))
        for i, block in enumerate(self.blocks):
            if i > max(self.transformer_blocks, default=-1):
                break
            if i in which:
                st = which[i]
                theta = st.theta(x)
                x = st.sample(x, st.grid(theta))
                full = jnp.concatenate(
                    [theta, jnp.broadcast_to(jnp.array([[0.0, 0.0, 1.0]]),
                                             (theta.shape[0], 1, 3))], axis=1)
                composed = full if composed is None else composed @ full
                grid = stn_jax.affine_grid(composed[:, :2], st.out_shape)
                views.append({"name": f"st{len(views) + 1}", "output": x, "grid": grid,
                              "input_view": stn_jax.bilinear_sample(image, grid)})
            x = block(x, rngs=None)
        return views


def create_model(name: str, *, input_shape: Sequence[int], dropout: float = 0.5,
                 batch_norm: bool = False, width: float = 1.0,
                 rngs: nnx.Rngs) -> SvhnClassifier:
    """Builds one Table-2 model.

    Args:
        name: "cnn" | "st_single" | "st_multi".
        input_shape: (H, W, C), e.g. (64, 64, 3), (54, 54, 3) (random crops), (128, 128, 3).
        dropout: the rate after every hidden layer but the first convolution [S: 0.5].
        batch_norm: batch norm after the classifier's convolutions and FC layers [?].
        width: multiplies the classifier's filters and FC units [?: 1 is the paper's].
        rngs: initialisation.

    Returns:
        An `SvhnClassifier`.

    Example:
        >>> model = create_model("st_multi", input_shape=(64, 64, 3), rngs=nnx.Rngs(0))
        >>> model.eval()
        >>> model(jnp.zeros((2, 64, 64, 3))).shape
        (2, 5, 11)
    """
    return SvhnClassifier(name, input_shape, dropout=dropout, batch_norm=batch_norm,
                          width=width, rngs=rngs)

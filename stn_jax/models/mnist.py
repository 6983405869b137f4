"""Table-1 models for distorted MNIST (Sect. 4.1): FCN, CNN, ST-FCN and ST-CNN.

Every model ends in a classification part of three weight layers [P] with ReLU, and returns
logits (the softmax lives in the loss):

- FCN: FC(width) -> FC(width) -> FC(num_classes).
- CNN: conv 9x9 (width, valid) -> max-pool 2 -> conv 7x7 (width, valid) -> max-pool 2 ->
  FC(num_classes). "Three weight layers" [P] counts the classifier, so there is no extra hidden
  FC layer. Pools are ceil-mode (a ragged last row/column is pooled on its own), so that the
  21x21 output of a downsampling ST on 42x42 RTS still leaves a 1x1 map: 21 -> 13 -> 7 -> 1 -> 1.
- ST-FCN: an ST on the input, localisation net FC 32 -> FC 32 -> FC 32 -> regression [S],
  then the FCN.
- ST-CNN: an ST on the input, localisation net max-pool 2 -> conv 5x5x20 -> max-pool 2 ->
  conv 5x5x20 -> FC 20 -> regression [S] (valid convs, ReLU), then the CNN.

On RTS (42x42) and TC (60x60) the transformer's output is half the input's size
(`st_downsample=2`) [S]; the models without a transformer ignore `st_downsample`.

Parameter matching (the paper: "all networks have approximately the same number of
parameters" [P]). The rule, one number per input shape: the target is the parameter count of the
FCN whose two hidden layers have `reference_width` units (default 128 [?]). Every model has one
free width (hidden units of the FCN part; filters of both convs of the CNN part, kept equal), and
`solve_width` picks the integer width whose exact parameter count, localisation net and
regression layer included, is closest to the target. The localisation nets keep their fixed
sizes from the paper's description. `param_count` is the closed form the solver uses;
tests check it against `count_params` of the built model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

import stn_jax
from stn_jax.models import count_params  # noqa: F401  (re-exported: mnist.count_params)
from stn_jax.models.layers import conv_general_dilated, max_pool_2x2
from stn_jax.grids import KINDS
from stn_jax.transformer import SpatialTransformer

MODEL_NAMES = ("fcn", "cnn", "st_fcn", "st_cnn")
REFERENCE_WIDTH = 128  # [?] FCN hidden width that sets the parameter budget of each input shape.
LOC_FC_UNITS = 32  # [S] ST-FCN localisation net: 3 FC layers of this width.
LOC_CONV_FILTERS = 20  # [S] ST-CNN localisation net: filters of both 5x5 convs.
LOC_CONV_FC_UNITS = 20  # [S] ST-CNN localisation net: the FC layer before the regression.


# ---------------------------------------------------------------- shapes and closed-form counts


def _linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _conv_params(k: int, n_in: int, n_out: int) -> int:
    return k * k * n_in * n_out + n_out


def _valid(size: int, k: int) -> int:
    return size - k + 1


def _ceil_pool(size: int) -> int:
    return -(-size // 2)


def _check_spatial(shape: tuple[int, int], what: str, in_shape) -> tuple[int, int]:
    # Sizes <= 0 stay <= 0 through later valid convs and ceil pools, so checking the last
    # size catches a map that vanished at any step.
    if min(shape) < 1:
        raise ValueError(f"input of shape {in_shape} is too small for the {what}")
    return shape


def cnn_feature_shape(hw: Sequence[int]) -> tuple[int, int]:
    """(H, W) of the CNN classifier's last feature map: conv9 -> pool2 -> conv7 -> pool2."""
    out = tuple(_ceil_pool(_valid(_ceil_pool(_valid(s, 9)), 7)) for s in hw)
    return _check_spatial(out, "CNN (needs at least 21x21)", tuple(hw))


def loc_cnn_feature_shape(hw: Sequence[int]) -> tuple[int, int]:
    """(H, W) of the ST-CNN localisation net's last conv map: pool2 -> conv5 -> pool2 -> conv5."""
    out = tuple(_valid(_ceil_pool(_valid(_ceil_pool(s), 5)), 5) for s in hw)
    return _check_spatial(out, "ST-CNN localisation net (needs at least 25x25)", tuple(hw))


def _n_theta(transform: str) -> int:
    return int(stn_jax.identity_params(transform).size)


def _fcn_head_params(n_in: int, width: int, num_classes: int) -> int:
    return (_linear_params(n_in, width) + _linear_params(width, width)
            + _linear_params(width, num_classes))


def _cnn_head_params(shape: tuple[int, int, int], width: int, num_classes: int) -> int:
    fh, fw = cnn_feature_shape(shape[:2])
    return (_conv_params(9, shape[2], width) + _conv_params(7, width, width)
            + _linear_params(fh * fw * width, num_classes))


def _loc_fc_params(n_in: int) -> int:
    return _linear_params(n_in, LOC_FC_UNITS) + 2 * _linear_params(LOC_FC_UNITS, LOC_FC_UNITS)


def _loc_cnn_params(shape: tuple[int, int, int]) -> int:
    fh, fw = loc_cnn_feature_shape(shape[:2])
    return (_conv_params(5, shape[2], LOC_CONV_FILTERS)
            + _conv_params(5, LOC_CONV_FILTERS, LOC_CONV_FILTERS)
            + _linear_params(fh * fw * LOC_CONV_FILTERS, LOC_CONV_FC_UNITS))


def _normalise_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = shape + (1,)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(
            f"input_shape must be (H, W) or (H, W, C) positive ints, got {input_shape!r}")
    return shape


def _st_out_shape(shape: tuple[int, int, int], st_downsample: int) -> tuple[int, int, int]:
    if not isinstance(st_downsample, int) or st_downsample < 1:
        raise ValueError(f"st_downsample must be a positive int, got {st_downsample!r}")
    h, w, c = shape
    if h % st_downsample or w % st_downsample:
        raise ValueError(
            f"st_downsample={st_downsample} must divide the input size {h}x{w}")
    return h // st_downsample, w // st_downsample, c


def _check_name_and_transform(name: str, transform: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    if transform not in KINDS:
        raise ValueError(f"transform must be one of {KINDS}, got {transform!r}")


def param_count(
    name: str,
    width: int,
    *,
    transform: str = "affine",
    input_shape: Sequence[int],
    num_classes: int = 10,
    st_downsample: int = 1,
) -> int:
    """Exact parameter count of `create_model(name, ...)` with the given width, without building it.

    Example:
        >>> param_count("fcn", 128, input_shape=(28, 28))  # 784*128+128 + 128*128+128 + 1290
        118282
    """
    _check_name_and_transform(name, transform)
    shape = _normalise_input_shape(input_shape)
    n_in = shape[0] * shape[1] * shape[2]
    if name == "fcn":
        return _fcn_head_params(n_in, width, num_classes)
    if name == "cnn":
        return _cnn_head_params(shape, width, num_classes)
    st_shape = _st_out_shape(shape, st_downsample)
    n_theta = _n_theta(transform)
    if name == "st_fcn":
        return (_loc_fc_params(n_in) + _linear_params(LOC_FC_UNITS, n_theta)
                + _fcn_head_params(st_shape[0] * st_shape[1] * st_shape[2], width, num_classes))
    return (_loc_cnn_params(shape) + _linear_params(LOC_CONV_FC_UNITS, n_theta)
            + _cnn_head_params(st_shape, width, num_classes))


def target_param_count(
    input_shape: Sequence[int], *, num_classes: int = 10, reference_width: int = REFERENCE_WIDTH
) -> int:
    """The parameter budget for one input shape: the FCN with `reference_width` hidden units."""
    return param_count("fcn", reference_width, input_shape=input_shape, num_classes=num_classes)


def solve_width(
    name: str,
    *,
    transform: str = "affine",
    input_shape: Sequence[int],
    num_classes: int = 10,
    st_downsample: int = 1,
    reference_width: int = REFERENCE_WIDTH,
) -> int:
    """The integer width whose `param_count` is closest to `target_param_count(input_shape)`.

    The count grows strictly with the width, so a bisection finds the first width at or above
    the target; the width just below may be closer.

    Example:
        >>> solve_width("fcn", input_shape=(28, 28))
        128
    """
    def count(width: int) -> int:
        return param_count(name, width, transform=transform, input_shape=input_shape,
                           num_classes=num_classes, st_downsample=st_downsample)

    target = target_param_count(input_shape, num_classes=num_classes,
                                reference_width=reference_width)
    if count(1) > target:
        raise ValueError(
            f"reference_width={reference_width} gives a budget of {target} parameters, less than "
            f"{name!r} needs at width 1 ({count(1)}): the localisation net does not fit")
    lo, hi = 1, 2
    while count(hi) < target:
        hi *= 2
    while lo < hi:  # first width with count >= target
        mid = (lo + hi) // 2
        if count(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    if lo > 1 and target - count(lo - 1) < count(lo) - target:
        return lo - 1
    return lo


# ---------------------------------------------------------------------------------- modules


def _max_pool2(x: jax.Array) -> jax.Array:
    # Ceil-mode pooling (see the module docstring), with a fast gradient on CPU (layers.py).
    return max_pool_2x2(x)


def _conv(n_in: int, n_out: int, k: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    # A k x k valid convolution; on CPU it runs as im2col + matmul (see layers.py).
    return nnx.Conv(n_in, n_out, kernel_size=(k, k), padding="VALID",
                    conv_general_dilated=conv_general_dilated, rngs=rngs)


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class FCNHead(nnx.Module):
    """Classification part of the FCN: flatten -> FC(width) -> FC(width) -> FC(num_classes)."""

    def __init__(self, in_features: int, width: int, num_classes: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_features, width, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, rngs=rngs)
        self.fc3 = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.fc1(_flatten(x)))
        x = nnx.relu(self.fc2(x))
        return self.fc3(x)


class CNNHead(nnx.Module):
    """Classification part of the CNN: conv9 -> pool2 -> conv7 -> pool2 -> FC(num_classes)."""

    def __init__(self, in_shape: tuple[int, int, int], width: int, num_classes: int, *,
                 rngs: nnx.Rngs):
        fh, fw = cnn_feature_shape(in_shape[:2])
        self.conv1 = _conv(in_shape[2], width, 9, rngs=rngs)
        self.conv2 = _conv(width, width, 7, rngs=rngs)
        self.fc = nnx.Linear(fh * fw * width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _max_pool2(nnx.relu(self.conv1(x)))
        x = _max_pool2(nnx.relu(self.conv2(x)))
        return self.fc(_flatten(x))


class FCLocalization(nnx.Module):
    """ST-FCN localisation net: flatten -> 3 x (FC(32) -> ReLU); features (B, 32)."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_features, LOC_FC_UNITS, rngs=rngs)
        self.fc2 = nnx.Linear(LOC_FC_UNITS, LOC_FC_UNITS, rngs=rngs)
        self.fc3 = nnx.Linear(LOC_FC_UNITS, LOC_FC_UNITS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.fc1(_flatten(x)))
        x = nnx.relu(self.fc2(x))
        return nnx.relu(self.fc3(x))


class CNNLocalization(nnx.Module):
    """ST-CNN localisation net: pool2 -> conv5x5x20 -> pool2 -> conv5x5x20 -> FC(20); (B, 20)."""

    def __init__(self, in_shape: tuple[int, int, int], *, rngs: nnx.Rngs):
        fh, fw = loc_cnn_feature_shape(in_shape[:2])
        self.conv1 = _conv(in_shape[2], LOC_CONV_FILTERS, 5, rngs=rngs)
        self.conv2 = _conv(LOC_CONV_FILTERS, LOC_CONV_FILTERS, 5, rngs=rngs)
        self.fc = nnx.Linear(fh * fw * LOC_CONV_FILTERS, LOC_CONV_FC_UNITS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(_max_pool2(x)))
        x = nnx.relu(self.conv2(_max_pool2(x)))
        return nnx.relu(self.fc(_flatten(x)))


class MnistClassifier(nnx.Module):
    """An optional spatial transformer on the input, then a classification head; returns logits.

    Build it with `create_model`. Attributes: `name`, `input_shape` (H, W, C), `width` (the
    solved width of the head), `transformer` (a `SpatialTransformer` or None).
    """

    def __init__(self, name: str, input_shape: tuple[int, int, int], width: int, head,
                 transformer: SpatialTransformer | None = None):
        self.name = name
        self.input_shape = input_shape
        self.width = width
        self.head = head
        self.transformer = transformer

    @property
    def has_transformer(self) -> bool:
        return self.transformer is not None

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x (B, H, W, C) float32 -> logits (B, num_classes). `rngs` is unused: the Table-1
        models have no dropout (the argument is the task interface's)."""
        del rngs
        self._check_input(x)
        if self.transformer is not None:
            x, _ = self.transformer(x)
        return self.head(x)

    def transformer_views(self, x: jax.Array) -> list[dict[str, jax.Array]]:
        """For pictures: one dict per transformer (none or one here) with "name", "output"
        (B, H', W', C) and "grid" (B, H', W', 2) in normalised input coordinates."""
        if self.transformer is None:
            return []
        output, _, grid = self.spatial_transform(x)
        return [{"name": "input ST", "output": output, "grid": grid}]

    def spatial_transform(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """For pictures: (ST output (B, H', W', C), theta, sampling grid (B, H', W', 2))."""
        if self.transformer is None:
            raise ValueError(f"model {self.name!r} has no spatial transformer")
        self._check_input(x)
        theta = self.transformer.theta(x)
        grid = self.transformer.grid(theta)
        return self.transformer.sample(x, grid), theta, grid


def create_model(
    name: str,
    *,
    transform: str = "affine",
    input_shape: Sequence[int],
    num_classes: int = 10,
    st_downsample: int = 1,
    reference_width: int = REFERENCE_WIDTH,
    rngs: nnx.Rngs,
) -> MnistClassifier:
    """Builds one Table-1 model, sized to the parameter budget of its input shape.

    Args:
        name: "fcn" | "cnn" | "st_fcn" | "st_cnn".
        transform: the ST's kind for ST models: "affine" | "projective" | "tps" (16 control
            points on a regular 4x4 grid) in Table 1; "attention" also works. Ignored otherwise.
        input_shape: (H, W) or (H, W, C) of the input, e.g. (28, 28), (42, 42), (60, 60).
        num_classes: classifier outputs.
        st_downsample: the ST's output is the input size divided by this (2 on RTS and TC).
        reference_width: FCN hidden width whose parameter count every model is matched to.
        rngs: initialisation.

    Returns:
        A `MnistClassifier`: `model(x)` maps x (B, H, W, C) float32 to logits (B, num_classes).

    Example:
        >>> model = create_model("st_cnn", transform="tps", input_shape=(42, 42),
        ...                      st_downsample=2, rngs=nnx.Rngs(0))
        >>> model(jax.numpy.zeros((4, 42, 42, 1))).shape
        (4, 10)
    """
    _check_name_and_transform(name, transform)
    shape = _normalise_input_shape(input_shape)
    width = solve_width(name, transform=transform, input_shape=shape, num_classes=num_classes,
                        st_downsample=st_downsample, reference_width=reference_width)
    n_in = shape[0] * shape[1] * shape[2]
    if name == "fcn":
        return MnistClassifier(name, shape, width, FCNHead(n_in, width, num_classes, rngs=rngs))
    if name == "cnn":
        return MnistClassifier(name, shape, width, CNNHead(shape, width, num_classes, rngs=rngs))

    st_shape = _st_out_shape(shape, st_downsample)
    if name == "st_fcn":
        loc, loc_features = FCLocalization(n_in, rngs=rngs), LOC_FC_UNITS
        head = FCNHead(st_shape[0] * st_shape[1] * st_shape[2], width, num_classes, rngs=rngs)
    else:
        loc, loc_features = CNNLocalization(shape, rngs=rngs), LOC_CONV_FC_UNITS
        head = CNNHead(st_shape, width, num_classes, rngs=rngs)
    transformer = SpatialTransformer(loc, loc_features=loc_features, kind=transform,
                                     out_shape=st_shape[:2], rngs=rngs)
    return MnistClassifier(name, shape, width, head, transformer)

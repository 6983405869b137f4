"""Table-3 models for CUB-200-2011 (Sect. 4.3): a CNN and N x ST-CNN with parallel attention.

- CNN (N = 0): a pretrained backbone on the whole image -> global average -> dropout ->
  classifier (logits; the softmax is in the loss).
- N x ST-CNN (N = 2, 4): N attention transformers on the input image share one localisation
  net [S]: the backbone's last feature map (no last pool) -> 1x1 conv 128 -> ReLU -> FC 128 ->
  ReLU -> FC 2N, the (tx, ty) of each transformer; the scale is fixed at `scale` (0.5) [S], or
  regressed too with `learn_scale` (FC 3N) [?]. The regression starts with zero weights and the
  bias that tiles the image (N = 2: tx = -0.5, +0.5; N = 4: the four quadrants) [S]. Each
  transformer samples a `crop_size` crop (224 px [P]: a 448 input is sampled down) and feeds
  its own part backbone [P]; the N pooled features are concatenated -> dropout -> classifier.

Every backbone (localisation and parts) starts from the same pretrained weights
(`load_pretrained_backbones`). The model takes RGB images with values 0-255 (uint8 or float);
each backbone applies its own input convention (`stn_jax.models.backbones.preprocess`), and
the transformers sample the RGB image itself, so their outputs are pictures.

The shared transformers are one `ParallelAttention`, a `stn_jax.SpatialTransformer`: the
training loop finds it by type and gives its parameters (localisation backbone included) the
localisation learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stn_jax.grids import attention_grid
from stn_jax.models import backbones as backbones_lib
from stn_jax.sampling import bilinear_sample
from stn_jax.transformer import SpatialTransformer

NUM_ST_CHOICES = (0, 2, 4)
LOC_CHANNELS = 128  # [S] 1x1 conv on the backbone's last map.
LOC_HIDDEN = 128  # [S] FC before the regression.


def tiling_centres(num: int) -> np.ndarray:
    """(num, 2) centres (tx, ty) of `num` crops tiling [-1, 1]^2: a row of cells, then rows.

    cols = ceil(sqrt(num)), rows = ceil(num / cols); cells are filled row by row.

    Example:
        >>> tiling_centres(2).tolist()
        [[-0.5, 0.0], [0.5, 0.0]]
        >>> tiling_centres(4).tolist()
        [[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    cols = math.ceil(math.sqrt(num))
    rows = math.ceil(num / cols)
    centres = [(-1 + (2 * c + 1) / cols, -1 + (2 * r + 1) / rows)
               for r in range(rows) for c in range(cols)]
    return np.array(centres[:num], np.float32)


class LocalisationNet(nnx.Module):
    """Backbone features (no last pool) -> 1x1 conv 128 -> ReLU -> FC 128 -> ReLU [S].

    With `batch_norm`, batch norm before each ReLU [?]: the regression then sees unit-scale
    features whatever the backbone's scale (SqueezeNet's fire9 is not normalised, and with
    its raw features even a 1e-4 learning rate threw the crops off the image in one step).
    """

    def __init__(self, backbone: nnx.Module, *, feature_shape: Sequence[int],
                 channels: int = LOC_CHANNELS, hidden: int = LOC_HIDDEN,
                 batch_norm: bool = True, rngs: nnx.Rngs):
        h, w, c = feature_shape
        self.backbone = backbone
        self.conv = nnx.Conv(c, channels, (1, 1), rngs=rngs)
        self.fc = nnx.Linear(h * w * channels, hidden, rngs=rngs)
        self.conv_bn = nnx.BatchNorm(channels, momentum=0.9, rngs=rngs) if batch_norm else None
        self.fc_bn = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs) if batch_norm else None

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.conv(self.backbone.features(images))
        x = jax.nn.relu(x if self.conv_bn is None else self.conv_bn(x))
        x = self.fc(x.reshape(x.shape[0], -1))
        return jax.nn.relu(x if self.fc_bn is None else self.fc_bn(x))


class ParallelAttention(SpatialTransformer):
    """N attention transformers on one image, sharing a localisation net.

    theta (B, N, 3) = (s, tx, ty) per transformer; output (B, N, H', W', C), bilinear sampling
    with zero padding, `align_corners=False` (the core's grid and sampler, called as they are).

    Args:
        localization: maps images (B, H, W, C) to (B, loc_features).
        loc_features: its width.
        num_st: N >= 1.
        out_shape: (H', W') of each crop.
        scale: the starting (fixed unless `learn_scale`) scale s; 0.5 [S].
        learn_scale: regress s too (FC 3N, bias started at `scale`) [?].
        rngs: initialisation.

    Example:
        >>> loc = nnx.Sequential(lambda x: x.mean((1, 2)), nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
        >>> st = ParallelAttention(loc, loc_features=4, num_st=2, out_shape=(8, 8),
        ...                        rngs=nnx.Rngs(0))
        >>> st(jnp.zeros((1, 16, 16, 3)))[1][0].tolist()
        [[0.5, -0.5, 0.0], [0.5, 0.5, 0.0]]
    """

    # SpatialTransformer.__init__ builds one regression for one transformer; this class sets
    # the attributes the base's helpers (grid, sample) read, and its own regression.
    def __init__(self, localization: nnx.Module, *, loc_features: int, num_st: int,
                 out_shape: Sequence[int], scale: float = 0.5, learn_scale: bool = False,
                 rngs: nnx.Rngs):
        if not isinstance(num_st, int) or num_st < 1:
            raise ValueError(f"num_st must be a positive int, got {num_st!r}")
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale!r}")
        self.kind = "attention"
        self.out_shape = tuple(int(s) for s in out_shape)
        self.padding_mode, self.align_corners, self.sampler = "zeros", False, "bilinear"
        self.control_points = None
        self.control_point_param = None
        self.param_shape = (num_st, 3)
        self.num_st, self.scale, self.learn_scale = num_st, float(scale), bool(learn_scale)
        self.localization = localization
        centres = tiling_centres(num_st)
        if learn_scale:
            start = np.concatenate([np.full((num_st, 1), scale, np.float32), centres], 1)
        else:
            start = centres

        def bias_init(key, shape, dtype=jnp.float32):
            del key
            return jnp.asarray(start.reshape(shape), dtype)

        # Zero weights + the tiling bias: every image starts with the tiling crops [S].
        self.regression = nnx.Linear(loc_features, start.size, kernel_init=nnx.initializers.zeros,
                                     bias_init=bias_init, rngs=rngs)

    def theta(self, x: jax.Array) -> jax.Array:
        """(B, N, 3) = (s, tx, ty) of each transformer for images x (B, H, W, C)."""
        out = self.regression(self.localization(x))
        if self.learn_scale:
            return out.reshape(x.shape[0], self.num_st, 3)
        shift = out.reshape(x.shape[0], self.num_st, 2)
        return jnp.concatenate([jnp.full_like(shift[..., :1], self.scale), shift], axis=-1)

    def grids(self, theta: jax.Array) -> jax.Array:
        """(B, N, H', W', 2) sampling grids of theta (B, N, 3)."""
        b, n, _ = theta.shape
        grid = attention_grid(theta.reshape(b * n, 3), self.out_shape,
                              align_corners=self.align_corners)
        return grid.reshape((b, n) + grid.shape[1:])

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Crops (B, N, H', W', C) of x (B, H, W, C), and theta (B, N, 3)."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, H, W, C), got {x.shape}")
        theta = self.theta(x)
        grids = self.grids(theta)
        crops = jnp.stack([bilinear_sample(x, grids[:, i], align_corners=self.align_corners)
                           for i in range(self.num_st)], axis=1)
        return crops, theta


class CubModel(nnx.Module):
    """CNN (num_st = 0) or num_st x ST-CNN for CUB; returns logits (B, num_classes).

    Args:
        backbone: "bn_inception" | "squeezenet1_1".
        num_classes: classes of the softmax (200 for CUB).
        num_st: 0, 2 or 4 transformers (any N >= 0 works; the paper's are 0, 2, 4).
        image_size: side of the (square) input, 448 or 224 [P].
        crop_size: side of each transformer's crop, 224 [P].
        scale, learn_scale: see `ParallelAttention`.
        dropout: rate before the classifier, 0.7 [S].
        batch_norm: batch norm in the localisation head and on the concatenated features
            before dropout [?] (see `LocalisationNet`; the same scale argument holds for the
            classifier: SqueezeNet's pooled features are in the tens).
        seed: seeds the host-drawn initial backbone weights (replaced by pretrained ones).
        rngs: initialisation of the localisation head and the classifier.

    Example:
        >>> m = CubModel(backbone="squeezenet1_1", num_classes=10, num_st=2, image_size=64,
        ...              crop_size=32, rngs=nnx.Rngs(0))
        >>> m.eval(); m(jnp.zeros((1, 64, 64, 3))).shape
        (1, 10)
    """

    def __init__(self, *, backbone: str, num_classes: int, num_st: int, image_size: int,
                 crop_size: int = 224, scale: float = 0.5, learn_scale: bool = False,
                 dropout: float = 0.7, batch_norm: bool = True, seed: int = 0,
                 rngs: nnx.Rngs):
        if backbone not in backbones_lib.BACKBONES:
            raise ValueError(f"backbone must be one of {backbones_lib.BACKBONES}, got {backbone!r}")
        if not isinstance(num_st, int) or num_st < 0:
            raise ValueError(f"num_st must be an int >= 0, got {num_st!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_st, self.image_size, self.crop_size = num_st, image_size, crop_size
        self.backbone_name = backbone

        def make(i):
            return backbones_lib.create_backbone(backbone, seed=seed + i)

        first = make(0)
        width = first.num_features
        if num_st == 0:
            self.transformer = None
            self.parts = nnx.List([first])
        else:
            feature_shape = jax.eval_shape(
                lambda x: first.features(x),
                jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)).shape[1:]
            loc = LocalisationNet(first, feature_shape=feature_shape, batch_norm=batch_norm,
                                  rngs=rngs)
            self.transformer = ParallelAttention(
                loc, loc_features=LOC_HIDDEN, num_st=num_st, out_shape=(crop_size, crop_size),
                scale=scale, learn_scale=learn_scale, rngs=rngs)
            self.parts = nnx.List([make(i + 1) for i in range(num_st)])
        self.feature_bn = (nnx.BatchNorm(width * len(self.parts), momentum=0.9, rngs=rngs)
                           if batch_norm else None)
        self.dropout = nnx.Dropout(dropout)
        self.classifier = nnx.Linear(width * len(self.parts), num_classes, rngs=rngs)

    def backbones(self) -> list[nnx.Module]:
        """Every backbone: the localisation one first (if any), then the parts."""
        loc = [] if self.transformer is None else [self.transformer.localization.backbone]
        return loc + list(self.parts)

    def features(self, images: jax.Array) -> jax.Array:
        """Concatenated pooled features (B, N * C) (or (B, C) for N = 0) of RGB 0-255 images."""
        x = jnp.asarray(images, jnp.float32)
        if self.transformer is None:
            return self.parts[0](x)
        crops, _ = self.transformer(x)
        return jnp.concatenate([part(crops[:, i]) for i, part in enumerate(self.parts)], axis=-1)

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits (B, num_classes) of RGB 0-255 images (B, H, W, 3)."""
        x = self.features(images)
        x = x if self.feature_bn is None else self.feature_bn(x)
        return self.classifier(self.dropout(x, rngs=rngs))

    def transformer_views(self, images: jax.Array) -> list[dict]:
        """One dict per transformer: name, output (B, H', W', 3) RGB 0-255 crop, grid
        (B, H', W', 2) on the input image, theta (B, 3). Empty for N = 0."""
        if self.transformer is None:
            return []
        x = jnp.asarray(images, jnp.float32)
        crops, theta = self.transformer(x)
        grids = self.transformer.grids(theta)
        return [{"name": f"st{i + 1}", "output": crops[:, i], "grid": grids[:, i],
                 "theta": theta[:, i]} for i in range(self.num_st)]


def load_pretrained_backbones(model: CubModel, *, path: str = "", download: bool = False) -> str:
    """Fills every backbone of `model` with the same pretrained weights; returns the file.

    The file is read once into the first backbone and its state copied to the others.
    """
    nets = model.backbones()
    file = backbones_lib.load_pretrained(nets[0], path=path, download=download)
    state = nnx.state(nets[0])
    for net in nets[1:]:
        nnx.update(net, jax.tree.map(jnp.copy, state))
    return file

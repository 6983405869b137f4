"""The spatial transformer module: localisation net -> grid generator -> sampler (Sect. 3).

`SpatialTransformer` wires any localisation network to a regression layer, one of the core grid
generators (`stn_jax.affine_grid`, `attention_grid`, `projective_grid`, `tps_grid`) and one of the
core samplers (`stn_jax.bilinear_sample`, `nearest_sample`). It only calls those pure functions;
all the coordinate maths lives in the core.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# From the submodules, not the package, so that `stn_jax/__init__.py` may import this module.
from stn_jax.grids import (
    affine_grid,
    attention_grid,
    identity_params,
    projective_grid,
    tps_grid,
)
from stn_jax._fast_paths import METHODS
from stn_jax.sampling import PADDING_MODES, bilinear_sample, nearest_sample

SAMPLERS = ("bilinear", "nearest")


def _check_out_shape(out_shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(out_shape)
    if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"out_shape must be two positive ints (H', W'), got {out_shape!r}")
    return shape


class SpatialTransformer(nnx.Module):
    """A spatial transformer: theta = regression(loc(x)); out = sample(x, grid(theta)).

    The regression layer starts with zero weights and a bias equal to the identity parameters of
    `kind`, so at initialisation theta is the identity for every input and, with
    `out_shape == x.shape[1:3]`, the output equals the input. Sampling is done identically for
    every channel, so the module works on images and on feature maps of any channel count.

    Args:
        localization: any NNX module mapping x (B, H, W, C) to features (B, loc_features).
        loc_features: width of the localisation features.
        kind: "affine" (theta (B, 2, 3)), "attention" (theta (B, 3) = (s, tx, ty)),
            "projective" (theta (B, 8): the first 8 row-major entries of the 3x3 matrix) or
            "tps" (theta (B, K, 2): where the K control points land in the input, normalised
            (x, y)). Any other value raises ValueError.
        out_shape: (H', W') of the output; may differ from the input's (e.g. downsampling by 2).
        padding_mode: "zeros" | "border" | "reflection", passed to the sampler.
        align_corners: coordinate convention of grid and sampler (torch `grid_sample` semantics).
        sampler: "bilinear" | "nearest".
        method: how the bilinear sampler computes (`stn_jax.bilinear_sample`'s `method`):
            "auto" (default), "gather", "native" or "separable". Only for sampler="bilinear".
        control_points: (K, 2) TPS control points in the output grid, normalised (x, y); only for
            kind="tps" (default: the regular 4x4 grid of `stn_jax.default_control_points`).
        learn_control_points: kind="tps" only. False (default): the control points are fixed
            constants. True: they are an `nnx.Param` (`control_point_param`), started at
            `control_points` and trained with the rest, so the target grid is learned, as the
            paper suggests (Sect. 3.1; `tps_grid` is differentiable in them).
        rngs: passed to the regression layer (whose initialisation is deterministic).

    Example:
        >>> loc = nnx.Sequential(lambda x: x.reshape(x.shape[0], -1),
        ...                      nnx.Linear(28 * 28, 32, rngs=nnx.Rngs(0)), nnx.relu)
        >>> st = SpatialTransformer(loc, loc_features=32, kind="affine", out_shape=(14, 14),
        ...                         rngs=nnx.Rngs(0))
        >>> out, theta = st(jnp.zeros((8, 28, 28, 1)))
        >>> out.shape, theta.shape
        ((8, 14, 14, 1), (8, 2, 3))
    """

    def __init__(
        self,
        localization,
        *,
        loc_features: int,
        kind: str,
        out_shape: Sequence[int],
        padding_mode: str = "zeros",
        align_corners: bool = False,
        sampler: str = "bilinear",
        method: str = "auto",
        control_points=None,
        learn_control_points: bool = False,
        rngs: nnx.Rngs,
    ):
        # identity_params checks kind and control_points (shape (K, 2), tps only).
        identity = identity_params(kind, control_points=control_points)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method != "auto" and sampler != "bilinear":
            raise ValueError(f"method={method!r} needs sampler='bilinear', got {sampler!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if not isinstance(loc_features, int) or loc_features <= 0:
            raise ValueError(f"loc_features must be a positive int, got {loc_features!r}")
        if not isinstance(learn_control_points, bool):
            raise TypeError(f"learn_control_points must be a bool, got {learn_control_points!r}")
        if learn_control_points and kind != "tps":
            raise ValueError(f"learn_control_points=True needs kind='tps', got kind={kind!r}")

        self.kind = kind
        self.out_shape = _check_out_shape(out_shape)
        self.padding_mode = padding_mode
        self.align_corners = align_corners
        self.sampler = sampler
        self.method = method
        # A nested tuple is static and hashable, so it lives in the graphdef, not the state: the
        # control points are fixed, never trained. (For tps the identity is the control points.)
        self.control_points = None if control_points is None else tuple(
            tuple(row) for row in np.asarray(control_points, np.float32).tolist())
        # Learned: a parameter started at the control points (for tps the identity params are
        # the control points, default or given).
        self.control_point_param = (
            nnx.Param(jnp.asarray(identity, jnp.float32)) if learn_control_points else None)
        self.param_shape = tuple(identity.shape)
        self.localization = localization

        def identity_bias(key, shape, dtype=jnp.float32):
            del key
            return jnp.reshape(identity, shape).astype(dtype)

        # Zero weights + identity bias: theta starts at the identity whatever the features [P].
        self.regression = nnx.Linear(
            loc_features,
            identity.size,
            kernel_init=nnx.initializers.zeros,
            bias_init=identity_bias,
            rngs=rngs,
        )

    def _control_points_array(self):
        if self.control_point_param is not None:
            return self.control_point_param[...]
        if self.control_points is None:
            return None
        return jnp.asarray(self.control_points, jnp.float32)

    def theta(self, x: jax.Array) -> jax.Array:
        """Regressed transformation parameters for x (B, H, W, C), in the kind's natural shape."""
        features = self.localization(x)
        expected = (x.shape[0], self.regression.in_features)
        if features.shape != expected:
            raise ValueError(
                f"localization must return features of shape (B, loc_features) = {expected}, "
                f"got {features.shape}")
        params = self.regression(features)
        return params.reshape((x.shape[0],) + self.param_shape)

    def grid(self, theta: jax.Array) -> jax.Array:
        """Sampling grid (B, H', W', 2) of normalised input (x, y) points for theta."""
        kw = dict(align_corners=self.align_corners)
        if self.kind == "affine":
            return affine_grid(theta, self.out_shape, **kw)
        if self.kind == "attention":
            return attention_grid(theta, self.out_shape, **kw)
        if self.kind == "projective":
            return projective_grid(theta, self.out_shape, **kw)
        return tps_grid(
            theta, self.out_shape, control_points=self._control_points_array(), **kw)

    def sample(self, x: jax.Array, grid: jax.Array) -> jax.Array:
        """Samples x (B, H, W, C) at grid (B, H', W', 2) with this module's sampler options."""
        kw = dict(padding_mode=self.padding_mode, align_corners=self.align_corners)
        if self.sampler == "nearest":
            return nearest_sample(x, grid, **kw)
        return bilinear_sample(x, grid, method=self.method, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Transforms x (B, H, W, C); returns (out (B, H', W', C), theta)."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, H, W, C), got {x.shape}")
        theta = self.theta(x)
        return self.sample(x, self.grid(theta)), theta

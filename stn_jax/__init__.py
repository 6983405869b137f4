"""stn_jax: Spatial Transformer Networks (Jaderberg et al., NIPS 2015) in JAX.

The core is pure functions on jax arrays (NHWC, normalised (x, y) grids, torch grid_sample
conventions):

    grid = stn_jax.affine_grid(theta, (H_out, W_out))        # theta (B, 2, 3)
    out = stn_jax.bilinear_sample(image, grid)                # image (B, H, W, C)

See ``stn_jax.grids`` and ``stn_jax.sampling``; ``stn_jax.SpatialTransformer`` (flax.nnx) composes
them with a localisation network.
"""

from stn_jax.grids import (
    KINDS,
    affine_basis,
    affine_grid,
    attention_grid,
    default_control_points,
    identity_params,
    linear_grid,
    projective_grid,
    regular_grid,
    tps_basis,
    tps_grid,
)
from stn_jax.sampling import (
    PADDING_MODES,
    bilinear_sample,
    nearest_sample,
    register_native_kernels,
)

__version__ = "0.1.0"


def __getattr__(name):
    # The module needs flax; importing it lazily keeps `import stn_jax` (the core) jax-only.
    if name == "SpatialTransformer":
        from stn_jax.transformer import SpatialTransformer

        return SpatialTransformer
    raise AttributeError(f"module 'stn_jax' has no attribute {name!r}")


__all__ = [
    "KINDS",
    "PADDING_MODES",
    "SpatialTransformer",
    "affine_basis",
    "affine_grid",
    "attention_grid",
    "bilinear_sample",
    "default_control_points",
    "identity_params",
    "linear_grid",
    "nearest_sample",
    "projective_grid",
    "register_native_kernels",
    "regular_grid",
    "tps_basis",
    "tps_grid",
]

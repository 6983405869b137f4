"""Differentiable image samplers: bilinear (eqs. 5-7) and nearest (eq. 4) with hand-written VJPs.

Both read an image (B, H, W, C) at the normalised (x, y) points of a grid (B, *S, 2) and return
(B, *S, C). The conventions are exactly those of ``torch.nn.functional.grid_sample``:

* Unnormalise: ``align_corners=True``: x = (g + 1) / 2 * (W - 1);
  ``align_corners=False``: x = ((g + 1) * W - 1) / 2 (and likewise y with H).
* ``padding_mode="zeros"``: taps outside the image read 0.
  ``"border"``: the continuous coordinate is clamped to [0, S - 1]; its gradient is 0 at and
  beyond the edge. ``"reflection"``: the coordinate is reflected about [0, S - 1]
  (``align_corners=True``) or [-0.5, S - 0.5] (False), repeatedly, then clamped; its gradient
  flips sign with each reflection.
* Bilinear: x0 = floor(x), x1 = x0 + 1, weights from x - x0; at exact integer coordinates the
  grid gradient is the one-sided (floor) derivative, as in torch.
* Nearest: rounds half to even; its grid gradient is zero.
* A pixel coordinate within float rounding (2 * eps * (S + 1)) of an integer is snapped onto
  it, so the identity grid reproduces the image exactly and integer translations are exact
  shifts; torch differs there by its own rounding noise.

Non-finite grid values (NaN, +-inf) sample nothing: the output there is 0 in every padding mode
and both gradients are 0. Finite grid values are first clamped to [-1e6, 1e6] (normalised),
which changes nothing for "zeros" (such a point reads 0) and "border" (it reads the edge pixel
it points past) and keeps every index in range; nothing ever indexes out of bounds and no NaN
enters the output or the gradients. With "reflection" a huge point is reflected from the
clamped coordinate, where float32 resolves whole pixels at best: it reads some blend of image
pixels whose position carries no meaning (finite, within the image's range of values).

Determinism: on CPU both the native kernel (one thread per image gradient) and the gather
path give bit-identical gradients from run to run. On GPU, XLA's scatter-add in the gather
path's image gradient uses atomics, so its float rounding can differ between runs unless XLA
is told ``--xla_gpu_deterministic_ops=true`` (not measured here: no GPU).

Coordinates are computed in float32 (float64 for a float64 grid) and values are accumulated in
float32 (float64 for a float64 image), so bf16 / f16 images are sampled precisely; the output
has the image's dtype.

The VJPs are written by hand with one gather of the taps and one scatter-add into the image
gradient. They are themselves differentiable (grad of grad works).

This module depends on jax and numpy only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stn_jax import _fast_paths

__all__ = ["PADDING_MODES", "bilinear_sample", "nearest_sample"]

PADDING_MODES = ("zeros", "border", "reflection")

# Normalised grid values are clamped to +-_MAX_ABS_GRID before unnormalising, so that
# (g + 1) * size cannot overflow and every integer index fits in int32.
_MAX_ABS_GRID = 1e6


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_args(image, grid, padding_mode, align_corners, fn_name):
    image = jnp.asarray(image)
    grid = jnp.asarray(grid)
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise TypeError(
            f"{fn_name}: image must be a float array (B, H, W, C), got dtype {image.dtype}; "
            "convert it first, e.g. image.astype(jnp.float32) / 255"
        )
    if not jnp.issubdtype(grid.dtype, jnp.floating):
        raise TypeError(
            f"{fn_name}: grid must be a float array (B, *S, 2) of normalised (x, y), "
            f"got dtype {grid.dtype}"
        )
    if image.ndim != 4:
        raise ValueError(
            f"{fn_name}: image must have rank 4 (B, H, W, C) (NHWC), got shape {image.shape}"
        )
    if grid.ndim < 2 or grid.shape[-1] != 2:
        raise ValueError(
            f"{fn_name}: grid must have shape (B, *S, 2) with a last dimension of 2 (x, y), "
            f"got shape {grid.shape}"
        )
    if grid.shape[0] != image.shape[0]:
        raise ValueError(
            f"{fn_name}: grid batch size {grid.shape[0]} does not match image batch size "
            f"{image.shape[0]} (image {image.shape}, grid {grid.shape})"
        )
    if min(image.shape[1:3]) < 1:
        raise ValueError(f"{fn_name}: image must have H, W >= 1, got shape {image.shape}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"{fn_name}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}"
        )
    if not isinstance(align_corners, bool):
        raise TypeError(f"{fn_name}: align_corners must be a bool, got {align_corners!r}")
    return image, grid


# ---------------------------------------------------------------------------------------------
# Coordinates: normalised grid -> continuous pixel coordinate, with d(coordinate)/d(grid)
# ---------------------------------------------------------------------------------------------


def _clamp(x, lo, hi, deriv):
    """Where-based clamp with a zero derivative at and beyond the limits (jnp.clip gives 0.5)."""
    inside = (x > lo) & (x < hi)
    x = jnp.where(x <= lo, lo, jnp.where(x >= hi, hi, x))
    return x, jnp.where(inside, deriv, 0.0)


def _reflect(x, twice_low, twice_high, deriv):
    """Reflects x about [twice_low / 2, twice_high / 2] repeatedly (torch's reflect_coordinates)."""
    if twice_low == twice_high:
        return jnp.zeros_like(x), jnp.zeros_like(deriv)
    low = twice_low / 2
    span = (twice_high - twice_low) / 2
    x = x - low
    sign = jnp.where(x < 0, -1.0, 1.0).astype(x.dtype)
    x = jnp.abs(x)
    extra = jnp.fmod(x, span)
    flips = jnp.floor(x / span)
    odd = jnp.fmod(flips, 2.0) == 1.0
    x = jnp.where(odd, span - extra + low, extra + low)
    return x, deriv * jnp.where(odd, -sign, sign)


def _snap_to_integers(x, size):
    """Snaps coordinates within float rounding of an integer onto it.

    A normalised grid point cannot represent a pixel centre exactly (e.g. 2/7 - 1 in float32),
    so the identity grid would read x = j +- 1e-6 and blend in a neighbour. Snapping within
    2 * eps * (size + 1), the size of that rounding error, makes identity warps and integer
    translations exact and their grid gradient the one-sided (floor) derivative everywhere.
    The value moves by less than the coordinate's own rounding error; the gradient passes
    through unchanged (straight-through), so grad of grad is unaffected.
    """
    tol = 2 * jnp.finfo(x.dtype).eps * (size + 1)
    nearest = jnp.round(x)
    return jnp.where(jnp.abs(x - nearest) <= tol, x + jax.lax.stop_gradient(nearest - x), x)


def _source_coord(g, size, padding_mode, align_corners):
    """Maps normalised g (finite, clamped) to a pixel coordinate; returns (coord, d coord / d g)."""
    if align_corners:
        x = (g + 1) / 2 * (size - 1)
        deriv = jnp.full_like(g, (size - 1) / 2)
    else:
        x = ((g + 1) * size - 1) / 2
        deriv = jnp.full_like(g, size / 2)
    x = _snap_to_integers(x, size)
    if padding_mode == "zeros":
        # Beyond [-2, size + 1] every tap is outside and the gradient is 0 anyway; clamping keeps
        # the integer indices small.
        return _clamp(x, -2.0, size + 1.0, deriv)
    if padding_mode == "reflection":
        if align_corners:
            x, deriv = _reflect(x, 0, 2 * (size - 1), deriv)
        else:
            x, deriv = _reflect(x, -1, 2 * size - 1, deriv)
    return _clamp(x, 0.0, size - 1.0, deriv)


def _coords(grid, height, width, padding_mode, align_corners):
    """(B, N, 2) grid -> x, y, dx/dgx, dy/dgy, finite mask; each (B, N) in the coordinate dtype."""
    coord_dtype = jnp.promote_types(grid.dtype, jnp.float32)
    grid = grid.astype(coord_dtype)
    finite = jnp.all(jnp.isfinite(grid), axis=-1)
    g = jnp.where(finite[..., None], grid, 0.0)
    g, dclamp = _clamp(g, -_MAX_ABS_GRID, _MAX_ABS_GRID, jnp.ones_like(g))
    x, dx = _source_coord(g[..., 0], width, padding_mode, align_corners)
    y, dy = _source_coord(g[..., 1], height, padding_mode, align_corners)
    dx = jnp.where(finite, dx * dclamp[..., 0], 0.0)
    dy = jnp.where(finite, dy * dclamp[..., 1], 0.0)
    return x, y, dx, dy, finite


# ---------------------------------------------------------------------------------------------
# Taps: flat indices and weights, one gather, one scatter-add
# ---------------------------------------------------------------------------------------------


def _axis_taps(coord, size):
    """Floor tap and its right neighbour along one axis: indices (clamped), validity, weights."""
    c0 = jnp.floor(coord)
    w1 = coord - c0
    i0 = c0.astype(jnp.int32)
    i1 = i0 + 1
    valid0 = (i0 >= 0) & (i0 < size)
    valid1 = (i1 >= 0) & (i1 < size)
    return (jnp.clip(i0, 0, size - 1), jnp.clip(i1, 0, size - 1)), (valid0, valid1), (1 - w1, w1)


def _bilinear_taps(x, y, finite, height, width, acc_dtype):
    """The 4 taps (y0x0, y0x1, y1x0, y1x1) of every point: flat indices (B, N, 4) int32,
    validity masks (B, N, 4) and the axis weights needed for the grid gradient."""
    (ix0, ix1), (vx0, vx1), (wx0, wx1) = _axis_taps(x, width)
    (iy0, iy1), (vy0, vy1), (wy0, wy1) = _axis_taps(y, height)
    idx = jnp.stack([iy0 * width + ix0, iy0 * width + ix1, iy1 * width + ix0, iy1 * width + ix1], -1)
    mask = jnp.stack([vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1], -1) & finite[..., None]
    wx = (wx0.astype(acc_dtype), wx1.astype(acc_dtype))
    wy = (wy0.astype(acc_dtype), wy1.astype(acc_dtype))
    return idx, mask, wx, wy


def _global_index(idx, num_pixels):
    """Per-image pixel indices (B, N, T) -> indices into the flattened batch (B * P), or None
    when B * P does not fit in int32 (then the per-image forms below are used)."""
    b = idx.shape[0]
    if b * num_pixels >= 2**31:
        return None
    return idx + (jnp.arange(b, dtype=jnp.int32) * num_pixels)[:, None, None]


def _gather(flat_image, idx):
    """flat_image (B, P, C), idx (B, N, T) -> (B, N, T, C)."""
    b, p, c = flat_image.shape
    n, t = idx.shape[1:]
    global_idx = _global_index(idx, p)
    if global_idx is not None:
        # One gather from the flattened batch: on CPU this is several times faster than
        # take_along_axis, whose batched gather XLA lowers less well.
        return flat_image.reshape(b * p, c)[global_idx]
    taps = jnp.take_along_axis(flat_image, idx.reshape(b, n * t, 1), axis=1, mode="clip")
    return taps.reshape(b, n, t, c)


def _scatter_add(updates, idx, num_pixels):
    """updates (B, N, T, C) added at idx (B, N, T) into zeros (B, P, C)."""
    b, n, t, c = updates.shape
    global_idx = _global_index(idx, num_pixels)
    if global_idx is not None:
        out = jnp.zeros((b * num_pixels, c), updates.dtype)
        out = out.at[global_idx.reshape(-1)].add(updates.reshape(-1, c), mode="promise_in_bounds")
        return out.reshape(b, num_pixels, c)

    def one(u, i):
        return jnp.zeros((num_pixels, c), updates.dtype).at[i].add(u, mode="promise_in_bounds")

    return jax.vmap(one)(updates.reshape(b, n * t, c), idx.reshape(b, n * t))


# ---------------------------------------------------------------------------------------------
# Bilinear sampler
# ---------------------------------------------------------------------------------------------


def _bilinear_forward(image, grid, padding_mode, align_corners):
    b, h, w, c = image.shape
    acc_dtype = jnp.promote_types(image.dtype, jnp.float32)
    x, y, dx, dy, finite = _coords(grid, h, w, padding_mode, align_corners)
    idx, mask, (wx0, wx1), (wy0, wy1) = _bilinear_taps(x, y, finite, h, w, acc_dtype)
    weights = (wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1)
    taps = _gather(image.reshape(b, h * w, c).astype(acc_dtype), idx)
    # The 4-term sum written out: XLA's CPU reduction over a size-4 axis is several times slower.
    out = sum(jnp.where(mask[..., i, None], weights[i][..., None] * taps[:, :, i], 0.0)
              for i in range(4))
    return out.astype(image.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bilinear(image, grid, padding_mode, align_corners):
    return _bilinear_forward(image, grid, padding_mode, align_corners)


def _bilinear_fwd(image, grid, padding_mode, align_corners):
    return _bilinear_forward(image, grid, padding_mode, align_corners), (image, grid)


def _bilinear_bwd(padding_mode, align_corners, residuals, cotangent):
    image, grid = residuals
    b, h, w, c = image.shape
    acc_dtype = jnp.promote_types(image.dtype, jnp.float32)
    x, y, dx, dy, finite = _coords(grid, h, w, padding_mode, align_corners)
    idx, mask, (wx0, wx1), (wy0, wy1) = _bilinear_taps(x, y, finite, h, w, acc_dtype)
    weights = jnp.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], -1)
    weights = jnp.where(mask, weights, 0.0)
    g = cotangent.astype(acc_dtype)  # (B, N, C)

    # Eq. (6): each output pixel's cotangent goes to its 4 taps with the bilinear weights.
    d_image = _scatter_add(weights[..., None] * g[:, :, None, :], idx, h * w)
    d_image = d_image.reshape(image.shape).astype(image.dtype)

    # Eq. (7): d out / d x = wy0 (v01 - v00) + wy1 (v11 - v10), taps outside the image read 0.
    taps = _gather(image.reshape(b, h * w, c).astype(acc_dtype), idx)
    taps = jnp.where(mask[..., None], taps, 0.0)
    v00, v01, v10, v11 = (taps[:, :, i, :] for i in range(4))
    gx = jnp.sum(g * (wy0[..., None] * (v01 - v00) + wy1[..., None] * (v11 - v10)), axis=-1)
    gy = jnp.sum(g * (wx0[..., None] * (v10 - v00) + wx1[..., None] * (v11 - v01)), axis=-1)
    d_grid = jnp.stack([gx * dx.astype(acc_dtype), gy * dy.astype(acc_dtype)], axis=-1)
    return d_image, d_grid.astype(grid.dtype)


_bilinear.defvjp(_bilinear_fwd, _bilinear_bwd)
# Compiled once per shape and options, so eager calls do not dispatch dozens of small ops;
# inside a caller's jit it is inlined.
_bilinear_jit = jax.jit(_bilinear, static_argnums=(2, 3))


def bilinear_sample(
    image: ArrayLike,
    grid: ArrayLike,
    *,
    padding_mode: str = "zeros",
    align_corners: bool = False,
    method: str = "auto",
) -> jax.Array:
    """Bilinear sampling of an image at a grid of normalised points, eq. (5) of the paper.

    Equivalent to ``torch.nn.functional.grid_sample(mode="bilinear")`` in NHWC. Gradients flow to
    the image (eq. 6) and to the grid (eq. 7) through a hand-written VJP; at exact integer
    coordinates the grid gradient is the one-sided (floor) derivative, as in torch.

    Args:
      image: (B, H, W, C) float array (any float dtype; bf16/f16 are accumulated in float32).
      grid: (B, *S, 2) float array of normalised (x, y) input points: x along the width, y along
        the height, -1 and +1 the edges (see ``align_corners``). ``*S`` is any number of sample
        dimensions: (B, H', W', 2) for a warped image, or (B, T, H', W', 2) to take T warps of
        one image without copying it.
      padding_mode: what points outside the image read: "zeros", "border" (clamp) or
        "reflection".
      align_corners: if True, -1 and +1 are the centres of the corner pixels; if False (default),
        their outer edges.
      method: how to compute it; every method gives the same values and gradients.
        "auto" (default): the native C++ kernel on CPU for float32/float64 operands when it can
        be built (first use compiles it, once per machine), else "gather". "gather": pure JAX,
        one gather and one scatter-add. "native": force the C++ kernel (CPU only).
        "separable": two matrix products for axis-aligned grids (attention, eq. 2), falling
        back to "gather" at run time for other grids. See ``stn_jax._fast_paths``.

    Returns:
      (B, *S, C) array in the image's dtype. Non-finite grid points read 0 with zero gradients;
      huge ones (beyond +-1e6) read 0 ("zeros"), the edge ("border") or an arbitrary blend of
      pixels ("reflection"), never NaN (see the module docstring).

    Raises:
      TypeError: the image or grid is not a float array.
      ValueError: wrong ranks or shapes, batch sizes that differ, an unknown padding mode or
        method.
      RuntimeError: method="native" and the native kernel is unavailable.

    Example:
      >>> import jax.numpy as jnp, stn_jax
      >>> image = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> theta = jnp.array([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]])  # zoom 2x on the centre
      >>> grid = stn_jax.affine_grid(theta, (4, 4))
      >>> stn_jax.bilinear_sample(image, grid)[0, :, :, 0]
      Array([[ 3.75,  4.25,  4.75,  5.25],
             [ 5.75,  6.25,  6.75,  7.25],
             [ 7.75,  8.25,  8.75,  9.25],
             [ 9.75, 10.25, 10.75, 11.25]], dtype=float32)
    """
    image, grid = _check_args(image, grid, padding_mode, align_corners, "bilinear_sample")
    method = _fast_paths.resolve_method(method, image, grid)
    if method != "gather":
        return _fast_paths.bilinear_jit(image, grid, padding_mode, align_corners, method, _bilinear)
    b, c = image.shape[0], image.shape[-1]
    sample_shape = grid.shape[1:-1]
    out = _bilinear_jit(image, grid.reshape(b, -1, 2), padding_mode, align_corners)
    return out.reshape((b,) + sample_shape + (c,))


# ---------------------------------------------------------------------------------------------
# Nearest sampler
# ---------------------------------------------------------------------------------------------


def _nearest_taps(grid, height, width, padding_mode, align_corners):
    x, y, _, _, finite = _coords(grid, height, width, padding_mode, align_corners)
    ix = jnp.round(x).astype(jnp.int32)  # half to even, as torch's nearbyint
    iy = jnp.round(y).astype(jnp.int32)
    valid = finite & (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    idx = jnp.clip(iy, 0, height - 1) * width + jnp.clip(ix, 0, width - 1)
    return idx[..., None], valid[..., None]


def _nearest_forward(image, grid, padding_mode, align_corners):
    b, h, w, c = image.shape
    idx, valid = _nearest_taps(grid, h, w, padding_mode, align_corners)
    taps = _gather(image.reshape(b, h * w, c), idx)[:, :, 0, :]
    return jnp.where(valid, taps, 0).astype(image.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _nearest(image, grid, padding_mode, align_corners):
    return _nearest_forward(image, grid, padding_mode, align_corners)


def _nearest_fwd(image, grid, padding_mode, align_corners):
    return _nearest_forward(image, grid, padding_mode, align_corners), (image, grid)


def _nearest_bwd(padding_mode, align_corners, residuals, cotangent):
    image, grid = residuals
    b, h, w, c = image.shape
    idx, valid = _nearest_taps(grid, h, w, padding_mode, align_corners)
    acc_dtype = jnp.promote_types(image.dtype, jnp.float32)
    updates = jnp.where(valid[..., None], cotangent.astype(acc_dtype)[:, :, None, :], 0.0)
    d_image = _scatter_add(updates, idx, h * w).reshape(image.shape).astype(image.dtype)
    return d_image, jnp.zeros_like(grid)


_nearest.defvjp(_nearest_fwd, _nearest_bwd)
_nearest_jit = jax.jit(_nearest, static_argnums=(2, 3))


def nearest_sample(
    image: ArrayLike,
    grid: ArrayLike,
    *,
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> jax.Array:
    """Nearest-neighbour sampling at a grid of normalised points, eq. (4) of the paper.

    Equivalent to ``torch.nn.functional.grid_sample(mode="nearest")`` in NHWC: the continuous
    coordinate (after padding) is rounded half to even. The gradient to the image is the
    scatter of the output gradient to the pixels read; the gradient to the grid is zero.

    Args:
      image: (B, H, W, C) float array.
      grid: (B, *S, 2) float array of normalised (x, y) input points (see
        :func:`bilinear_sample`).
      padding_mode: "zeros", "border" or "reflection".
      align_corners: pixel-centre convention, as in :func:`bilinear_sample`.

    Returns:
      (B, *S, C) array in the image's dtype. Non-finite grid points read 0.

    Example:
      >>> import jax.numpy as jnp, stn_jax
      >>> image = jnp.arange(4.0).reshape(1, 2, 2, 1)
      >>> grid = jnp.array([[[[0.4, -0.6]]]])  # x -> pixel 1, y -> pixel 0
      >>> stn_jax.nearest_sample(image, grid, align_corners=True)[0, 0, 0, 0]
      Array(1., dtype=float32)
    """
    image, grid = _check_args(image, grid, padding_mode, align_corners, "nearest_sample")
    b, c = image.shape[0], image.shape[-1]
    sample_shape = grid.shape[1:-1]
    out = _nearest_jit(image, grid.reshape(b, -1, 2), padding_mode, align_corners)
    return out.reshape((b,) + sample_shape + (c,))

"""The pure-JAX maths of the samplers (the ``method="gather"`` path), shared by every path.

Private: :mod:`stn_jax.sampling` (the public samplers) and :mod:`stn_jax._fast_paths` (the native
and separable paths, which borrow these formulas for their derivatives and their portable
lowering) both import this module, which imports neither.

Each sampler is written as a value and a tangent: ``*_with_tangent(image, grid, t_image,
t_grid)`` returns the output and its directional derivative, the forward-mode form of the
hand-written sub-gradients of eqs. (6)-(7). The tangent is linear in ``(t_image, t_grid)`` and
built from one gather of the taps, so JAX transposes it into one scatter-add into the image
gradient and a per-point product for the grid gradient: reverse mode is that transpose.

Shapes: image (B, H, W, C), grid (B, N, 2) normalised (x, y); outputs (B, N, C).
This module depends on jax alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Normalised grid values are clamped to +-_MAX_ABS_GRID before unnormalising, so that
# (g + 1) * size cannot overflow and every integer index fits in int32.
_MAX_ABS_GRID = 1e6


# ---------------------------------------------------------------------------------------------
# Coordinates: normalised grid -> continuous pixel coordinate, with d(coordinate)/d(grid)
# ---------------------------------------------------------------------------------------------


def _size(d):
    """An image size for the coordinate maths: the int, or for a symbolic size (jax.export)
    its value as an int32 array."""
    return d if isinstance(d, int) else jnp.asarray(d, jnp.int32)


def _clamp(x, lo, hi, deriv):
    """Where-based clamp with a zero derivative at and beyond the limits (jnp.clip gives 0.5)."""
    inside = (x > lo) & (x < hi)
    x = jnp.where(x <= lo, lo, jnp.where(x >= hi, hi, x))
    return x, jnp.where(inside, deriv, 0.0)


def _reflect(x, twice_low, twice_high, deriv):
    """Reflects x about [twice_low / 2, twice_high / 2] repeatedly (torch's reflect_coordinates)."""
    symbolic = not isinstance(twice_high, int)
    if not symbolic and twice_low == twice_high:
        return jnp.zeros_like(x), jnp.zeros_like(deriv)
    low = twice_low / 2
    span = (twice_high - twice_low) / 2
    if symbolic:  # a size only known at run time: an image of size 1 is decided there
        degenerate = span == 0
        span = jnp.where(degenerate, 1.0, span).astype(x.dtype)
    x = x - low
    sign = jnp.where(x < 0, -1.0, 1.0).astype(x.dtype)
    x = jnp.abs(x)
    extra = jnp.fmod(x, span)
    flips = jnp.floor(x / span)
    odd = jnp.fmod(flips, 2.0) == 1.0
    x = jnp.where(odd, span - extra + low, extra + low)
    deriv = deriv * jnp.where(odd, -sign, sign)
    if symbolic:
        x, deriv = jnp.where(degenerate, 0.0, x), jnp.where(degenerate, 0.0, deriv)
    return x, deriv


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
    size = _size(size)
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
    size = _size(size)
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
    height, width = _size(height), _size(width)
    (ix0, ix1), (vx0, vx1), (wx0, wx1) = _axis_taps(x, width)
    (iy0, iy1), (vy0, vy1), (wy0, wy1) = _axis_taps(y, height)
    idx = jnp.stack([iy0 * width + ix0, iy0 * width + ix1, iy1 * width + ix0, iy1 * width + ix1], -1)
    mask = jnp.stack([vy0 & vx0, vy0 & vx1, vy1 & vx0, vy1 & vx1], -1) & finite[..., None]
    wx = (wx0.astype(acc_dtype), wx1.astype(acc_dtype))
    wy = (wy0.astype(acc_dtype), wy1.astype(acc_dtype))
    return idx, mask, wx, wy


def _batch_sharded(*arrays):
    """True if any array's type says its dimensions are sharded (a mesh with Explicit axes)."""
    for x in arrays:
        spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
        if spec is not None and any(s is not None for s in spec):
            return True
    return False


def _global_index(idx, num_pixels):
    """Per-image pixel indices (B, N, T) -> indices into the flattened batch (B * P), or None
    when B * P may not fit in int32, is symbolic (jax.export), or the batch is sharded in the
    types (Explicit mesh axes, where a gather across the merged axis has no sharding): the
    per-image form below is used then."""
    b = idx.shape[0]
    total = b * num_pixels
    if not isinstance(total, int) or total >= 2**31 or _batch_sharded(idx):
        return None
    return idx + (jnp.arange(b, dtype=jnp.int32) * num_pixels)[:, None, None]


def gather(flat_image, idx):
    """flat_image (B, P, C), idx (B, N, T) of in-range pixel indices -> (B, N, T, C).

    Its transpose (the image gradient) is one scatter-add into zeros (B, P, C).
    """
    b, p, c = flat_image.shape
    global_idx = _global_index(idx, p)
    if global_idx is not None and not _batch_sharded(flat_image):
        # One gather from the flattened batch: XLA's CPU lowering of a batched gather is much
        # slower (docs/performance.md, "What was tried").
        flat = flat_image.reshape(b * p, c)
        return flat.at[global_idx].get(mode="promise_in_bounds")
    # Per image: a gather with the batch as a batching dimension, which keeps its sharding.
    return jax.vmap(lambda im, i: im.at[i].get(mode="promise_in_bounds"))(flat_image, idx)


# ---------------------------------------------------------------------------------------------
# Samplers as value + tangent (forward mode); reverse mode is JAX's transpose of the tangent
# ---------------------------------------------------------------------------------------------


def bilinear_with_tangent(image, grid, t_image, t_grid, padding_mode, align_corners):
    """Bilinear sample (eq. 5) and its tangent (eqs. 6-7 in forward form).

    Args:
      image: (B, H, W, C); grid: (B, N, 2).
      t_image, t_grid: tangents like image and grid, or None for a zero tangent (then the
        returned tangent is None when both are).

    Returns:
      (out, t_out), each (B, N, C) in the image's dtype.
    """
    b, h, w, c = image.shape
    acc_dtype = jnp.promote_types(image.dtype, jnp.float32)
    x, y, dx, dy, finite = _coords(grid, h, w, padding_mode, align_corners)
    idx, mask, (wx0, wx1), (wy0, wy1) = _bilinear_taps(x, y, finite, h, w, acc_dtype)
    weights = (wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1)

    def blend(img):
        taps = gather(img.reshape(b, h * w, c).astype(acc_dtype), idx)
        # The 4-term sum written out: XLA's CPU reduction over a size-4 axis is much slower
        # (docs/performance.md).
        return taps, sum(jnp.where(mask[..., i, None], weights[i][..., None] * taps[:, :, i], 0.0)
                         for i in range(4))

    taps, out = blend(image)
    t_out = None
    if t_image is not None:
        # Eq. (6): the output is linear in the image, with the bilinear weights.
        t_out = blend(t_image)[1]
    if t_grid is not None:
        # Eq. (7): d out / d x = wy0 (v01 - v00) + wy1 (v11 - v10), taps outside read 0.
        taps = jnp.where(mask[..., None], taps, 0.0)
        v00, v01, v10, v11 = (taps[:, :, i, :] for i in range(4))
        d_dx = wy0[..., None] * (v01 - v00) + wy1[..., None] * (v11 - v10)
        d_dy = wx0[..., None] * (v10 - v00) + wx1[..., None] * (v11 - v01)
        tg = t_grid.astype(acc_dtype)
        t_coord = (d_dx * (dx.astype(acc_dtype) * tg[..., 0])[..., None]
                   + d_dy * (dy.astype(acc_dtype) * tg[..., 1])[..., None])
        t_out = t_coord if t_out is None else t_out + t_coord
    if t_out is not None:
        t_out = t_out.astype(image.dtype)
    return out.astype(image.dtype), t_out


def bilinear(image, grid, padding_mode, align_corners):
    """Bilinear sample, image (B, H, W, C), grid (B, N, 2) -> (B, N, C); no custom rule."""
    return bilinear_with_tangent(image, grid, None, None, padding_mode, align_corners)[0]


def _nearest_taps(grid, height, width, padding_mode, align_corners):
    x, y, _, _, finite = _coords(grid, height, width, padding_mode, align_corners)
    height, width = _size(height), _size(width)
    ix = jnp.round(x).astype(jnp.int32)  # half to even, as torch's nearbyint
    iy = jnp.round(y).astype(jnp.int32)
    valid = finite & (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
    idx = jnp.clip(iy, 0, height - 1) * width + jnp.clip(ix, 0, width - 1)
    return idx[..., None], valid[..., None]


def nearest_with_tangent(image, grid, t_image, padding_mode, align_corners):
    """Nearest sample (eq. 4) and its tangent; the grid's tangent contributes nothing."""
    b, h, w, c = image.shape
    idx, valid = _nearest_taps(grid, h, w, padding_mode, align_corners)

    def read(img):
        return jnp.where(valid, gather(img.reshape(b, h * w, c), idx)[:, :, 0, :], 0)

    t_out = None if t_image is None else read(t_image).astype(image.dtype)
    return read(image).astype(image.dtype), t_out

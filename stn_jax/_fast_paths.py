"""Fast paths of ``bilinear_sample``: the native CPU kernel and the separable (axis-aligned) warp.

Every path computes exactly what the pure-JAX reference in :mod:`stn_jax.sampling` computes
(``method="gather"``: one gather of the 4 taps, one scatter-add into the image gradient), the
same values and the same gradients to the image and the grid, in every padding mode and with
both ``align_corners``; the tests compare them with the reference.

``method`` of :func:`stn_jax.bilinear_sample`:

* ``"auto"`` (default): ``"native"`` when the image runs on the CPU, the native kernels are
  available (:func:`stn_jax._native.available`) and image and grid are both float32 or both
  float64; otherwise ``"gather"``. The platform is chosen when the function is lowered
  (``jax.lax.platform_dependent``), so a function jitted for a GPU or TPU takes the gather.
* ``"gather"``: the pure-JAX reference.
* ``"native"``: the C++ kernels through the XLA FFI (CPU only). Forward and backward are each
  one pass over the output points, parallel over the XLA intra-op thread pool; the image
  gradient is accumulated per image by one thread, so it is deterministic. Their derivatives
  (grad of grad, ``jax.hessian``) are those of the reference.
* ``"separable"``: for axis-aligned grids (every row of the grid has the same x, every column
  the same y; the attention transform of eq. (2), or an affine map without rotation or shear)
  the warp is two batched matrix products with tent-weight matrices, without gather or scatter,
  the form that suits TPUs. A grid that is not separable (checked at run time) takes the gather
  path, so the result is always right. Needs a grid of shape (B, H', W', 2).

This module depends on jax and numpy only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import _native

__all__ = ["METHODS", "bilinear", "bilinear_jit", "native_supported", "resolve_method"]

METHODS = ("auto", "gather", "native", "separable")

_PADDING_CODES = {"zeros": 0, "border": 1, "reflection": 2}
_HIGHEST = jax.lax.Precision.HIGHEST


def native_supported(image: jax.Array, grid: jax.Array) -> bool:
    """Whether the native kernel takes these operands (same dtype, float32 or float64)."""
    return image.dtype == grid.dtype and image.dtype in (jnp.float32, jnp.float64)


def resolve_method(method: str, image: jax.Array, grid: jax.Array) -> str:
    """Checks ``method`` and resolves it for these operands.

    Returns:
      "gather", "separable", "native", or "auto-native" (native on CPU, gather elsewhere).

    Raises:
      ValueError: an unknown method, or "native" for operands it does not take.
      RuntimeError: "native" when the native kernels cannot be built or loaded.
    """
    if method not in METHODS:
        raise ValueError(f"bilinear_sample: method must be one of {METHODS}, got {method!r}")
    if method == "native":
        if not native_supported(image, grid):
            raise ValueError(
                "bilinear_sample: method='native' needs image and grid of the same dtype, "
                f"float32 or float64; got image {image.dtype}, grid {grid.dtype}"
            )
        if not _native.available():
            raise RuntimeError(
                f"bilinear_sample: method='native' is unavailable: {_native.error()}"
            )
        return "native"
    if method == "separable" and grid.ndim != 4:
        raise ValueError(
            f"bilinear_sample: method='separable' needs a grid of shape (B, H', W', 2), "
            f"got {grid.shape}"
        )
    if method == "auto":
        return "auto-native" if native_supported(image, grid) and _native.available() else "gather"
    return method


def bilinear(image, grid, padding_mode: str, align_corners: bool, method: str, reference):
    """Samples with a resolved method (not "gather"); image (B, H, W, C), grid (B, *S, 2).

    ``reference(image, flat_grid, padding_mode, align_corners)`` is the gather path on a
    (B, N, 2) grid, the fallback.
    """
    b, c = image.shape[0], image.shape[-1]
    out_shape = grid.shape[:-1] + (c,)

    def gather(i, g):
        return reference(i, g.reshape(b, -1, 2), padding_mode, align_corners).reshape(out_shape)

    # The native kernel takes the grid as it is: a reshape around an FFI call can cost XLA a
    # layout-changing copy of the output as long as the sampling itself.
    if method == "native":
        return _native_bilinear(image, grid, padding_mode, align_corners)
    if method == "auto-native":
        return jax.lax.platform_dependent(
            image,
            grid,
            cpu=lambda i, g: _native_bilinear(i, g, padding_mode, align_corners),
            default=gather,
        )
    if method == "separable":
        return jax.lax.cond(
            _is_separable(grid),
            lambda i, g: _separable(i, g, padding_mode, align_corners),
            gather,
            image,
            grid,
        )
    raise ValueError(f"unresolved method {method!r}")


# Compiled once per shape and options, so eager calls do not dispatch dozens of small ops;
# inside a caller's jit it is inlined.
bilinear_jit = jax.jit(bilinear, static_argnums=(2, 3, 4, 5))


# ---------------------------------------------------------------------------------------------
# Native kernels (stn_jax/_native/bilinear.cc) through the XLA FFI
# ---------------------------------------------------------------------------------------------


def _ffi_forward(image, grid, padding_mode, align_corners):
    """image (B, H, W, C), grid (B, *S, 2) -> (B, *S, C)."""
    call = jax.ffi.ffi_call(
        _native.FORWARD_TARGET,
        jax.ShapeDtypeStruct(grid.shape[:-1] + image.shape[-1:], image.dtype),
        # The kernel treats every leading dimension as batch, so vmap only adds one.
        vmap_method="broadcast_all",
    )
    return call(image, grid, padding=np.int32(_PADDING_CODES[padding_mode]),
                align_corners=bool(align_corners))


def _ffi_backward(image, grid, cotangent, padding_mode, align_corners):
    call = jax.ffi.ffi_call(
        _native.BACKWARD_TARGET,
        (jax.ShapeDtypeStruct(image.shape, image.dtype), jax.ShapeDtypeStruct(grid.shape, grid.dtype)),
        vmap_method="broadcast_all",
    )
    return call(image, grid, cotangent, padding=np.int32(_PADDING_CODES[padding_mode]),
                align_corners=bool(align_corners))


# The FFI calls have no derivatives of their own: custom_jvp rules borrow the reference's, so
# grad of grad and forward-over-reverse (jax.hessian) give what the gather path gives.


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _native_forward(image, grid, padding_mode, align_corners):
    return _ffi_forward(image, grid, padding_mode, align_corners)


def _reference_forward(image, grid, padding_mode, align_corners):
    """The gather path's forward on a (B, *S, 2) grid."""
    from stn_jax import sampling

    b, c = image.shape[0], image.shape[-1]
    out = sampling._bilinear_forward(image, grid.reshape(b, -1, 2), padding_mode, align_corners)
    return out.reshape(grid.shape[:-1] + (c,))


def _reference_backward(image, grid, cotangent, padding_mode, align_corners):
    """The gather path's hand-written VJP on a (B, *S, 2) grid."""
    from stn_jax import sampling

    b, c = image.shape[0], image.shape[-1]
    residuals = (image, grid.reshape(b, -1, 2))
    d_image, d_grid = sampling._bilinear_bwd(
        padding_mode, align_corners, residuals, cotangent.reshape(b, -1, c)
    )
    return d_image, d_grid.reshape(grid.shape)


@_native_forward.defjvp
def _native_forward_jvp(padding_mode, align_corners, primals, tangents):
    _, tangent_out = jax.jvp(
        lambda i, g: _reference_forward(i, g, padding_mode, align_corners), primals, tangents
    )
    return _native_forward(*primals, padding_mode, align_corners), tangent_out


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _native_backward(image, grid, cotangent, padding_mode, align_corners):
    return _ffi_backward(image, grid, cotangent, padding_mode, align_corners)


@_native_backward.defjvp
def _native_backward_jvp(padding_mode, align_corners, primals, tangents):
    _, tangent_out = jax.jvp(
        lambda i, g, ct: _reference_backward(i, g, ct, padding_mode, align_corners),
        primals,
        tangents,
    )
    return _native_backward(*primals, padding_mode, align_corners), tangent_out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _native_bilinear(image, grid, padding_mode, align_corners):
    return _native_forward(image, grid, padding_mode, align_corners)


def _native_bilinear_fwd(image, grid, padding_mode, align_corners):
    return _native_forward(image, grid, padding_mode, align_corners), (image, grid)


def _native_bilinear_bwd(padding_mode, align_corners, residuals, cotangent):
    image, grid = residuals
    return _native_backward(image, grid, cotangent.astype(image.dtype), padding_mode, align_corners)


_native_bilinear.defvjp(_native_bilinear_fwd, _native_bilinear_bwd)


# ---------------------------------------------------------------------------------------------
# Separable path: out = Ky @ image @ Kx^T per image and channel, for axis-aligned grids
# ---------------------------------------------------------------------------------------------


def _is_separable(grid):
    """True if every row of the grid has the same x and every column the same y (all images)."""
    same_x = jnp.all(grid[..., 0] == grid[:, :1, :, 0])
    same_y = jnp.all(grid[..., 1] == grid[:, :, :1, 1])
    return same_x & same_y


def _axis_weights(g, size, padding_mode, align_corners, acc_dtype):
    """Tent-weight matrix of one axis and its derivative.

    Args:
      g: (B, S) normalised coordinates along one axis (x of a grid row, or y of a grid column).

    Returns:
      K (B, S, size): K[b, s, i] = bilinear weight of input pixel i for output s (0 outside);
      dK (B, S, size): d K / d(pixel coordinate) ignoring validity of the other axis
      (-1 at the floor tap, +1 at the next, for taps inside the image);
      deriv (B, S): d(pixel coordinate) / d g (0 where g is not finite or clamped);
      finite (B, S).
    """
    from stn_jax import sampling

    coord_dtype = jnp.promote_types(g.dtype, jnp.float32)
    g = g.astype(coord_dtype)
    finite = jnp.isfinite(g)
    g = jnp.where(finite, g, 0.0)
    g, dclamp = sampling._clamp(g, -sampling._MAX_ABS_GRID, sampling._MAX_ABS_GRID, jnp.ones_like(g))
    x, deriv = sampling._source_coord(g, size, padding_mode, align_corners)
    deriv = jnp.where(finite, deriv * dclamp, 0.0)
    x0 = jnp.floor(x)
    w1 = x - x0
    w0 = (1 - w1).astype(acc_dtype)
    w1 = w1.astype(acc_dtype)
    i0 = x0.astype(jnp.int32)[..., None]
    pixels = jnp.arange(size, dtype=jnp.int32)
    # Taps outside [0, size) match no pixel, so they read 0 as in the gather path.
    tap0 = (pixels == i0) & finite[..., None]
    tap1 = (pixels == i0 + 1) & finite[..., None]
    weights = jnp.where(tap0, w0[..., None], 0.0) + jnp.where(tap1, w1[..., None], 0.0)
    dweights = tap1.astype(acc_dtype) - tap0.astype(acc_dtype)
    return weights.astype(acc_dtype), dweights, deriv.astype(acc_dtype), finite


def _separable_parts(image, grid, padding_mode, align_corners):
    _, h, w, _ = image.shape
    acc_dtype = jnp.promote_types(image.dtype, jnp.float32)
    kx, dkx, derx, _ = _axis_weights(grid[:, 0, :, 0], w, padding_mode, align_corners, acc_dtype)
    ky, dky, dery, _ = _axis_weights(grid[:, :, 0, 1], h, padding_mode, align_corners, acc_dtype)
    return acc_dtype, (kx, dkx, derx), (ky, dky, dery)


def _warp(ky, kx, image):
    """sum_{h,w} ky[b,i,h] kx[b,j,w] image[b,h,w,c], contracting the cheaper axis first."""
    b, h, w, c = image.shape
    ho, wo = ky.shape[1], kx.shape[1]
    if ho * h * w + ho * wo * w <= wo * w * h + ho * wo * h:
        rows = jnp.einsum("bih,bhwc->biwc", ky, image, precision=_HIGHEST)
        return jnp.einsum("bjw,biwc->bijc", kx, rows, precision=_HIGHEST)
    cols = jnp.einsum("bjw,bhwc->bhjc", kx, image, precision=_HIGHEST)
    return jnp.einsum("bih,bhjc->bijc", ky, cols, precision=_HIGHEST)


def _separable_forward(image, grid, padding_mode, align_corners):
    acc_dtype, (kx, _, _), (ky, _, _) = _separable_parts(image, grid, padding_mode, align_corners)
    return _warp(ky, kx, image.astype(acc_dtype)).astype(image.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _separable(image, grid, padding_mode, align_corners):
    return _separable_forward(image, grid, padding_mode, align_corners)


def _separable_fwd(image, grid, padding_mode, align_corners):
    return _separable_forward(image, grid, padding_mode, align_corners), (image, grid)


def _separable_bwd(padding_mode, align_corners, residuals, cotangent):
    image, grid = residuals
    acc_dtype, (kx, dkx, derx), (ky, dky, dery) = _separable_parts(
        image, grid, padding_mode, align_corners
    )
    img = image.astype(acc_dtype)
    g = cotangent.astype(acc_dtype)  # (B, H', W', C)
    # Eq. (6): the transpose of the warp.
    d_image = _warp(jnp.swapaxes(ky, 1, 2), jnp.swapaxes(kx, 1, 2), g).astype(image.dtype)
    # Eq. (7): d out / d x at (i, j) = sum_{h,w} ky[i,h] dkx[j,w] image[h,w]; likewise for y.
    d_out_dx = _warp(ky, dkx, img)
    d_out_dy = _warp(dky, kx, img)
    gx = jnp.sum(g * d_out_dx, axis=-1) * derx[:, None, :]
    gy = jnp.sum(g * d_out_dy, axis=-1) * dery[:, :, None]
    return d_image, jnp.stack([gx, gy], axis=-1).astype(grid.dtype)


_separable.defvjp(_separable_fwd, _separable_bwd)

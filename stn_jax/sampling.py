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

Derivatives are written by hand as tangents (the forward-mode form of eqs. (6)-(7)): one
gather of the taps, linear in the image's and the grid's tangents. Forward mode (``jax.jvp``,
``jax.jacfwd``, ``jax.linearize``) evaluates them; reverse mode is their transpose, one
scatter-add into the image gradient and a per-point product for the grid gradient. Both are
themselves differentiable (grad of grad, ``jax.hessian``). Every method composes with jit,
vmap, scan, remat, ``jax.shard_map``, meshes with Auto or Explicit axes, and ``jax.export``
(see :func:`register_native_kernels` for exporting the native kernel).

This module depends on jax and numpy only (the native kernel's loader logs through absl).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from stn_jax import _fast_paths, _native, _reference

__all__ = ["PADDING_MODES", "bilinear_sample", "nearest_sample", "register_native_kernels"]

PADDING_MODES = ("zeros", "border", "reflection")


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _same_dim(a, b) -> bool:
    """a == b for sizes that may be symbolic (jax.export); an inconclusive comparison passes."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - jax's InconclusiveDimensionOperation
        return True


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
    if not _same_dim(grid.shape[0], image.shape[0]):
        raise ValueError(
            f"{fn_name}: grid batch size {grid.shape[0]} does not match image batch size "
            f"{image.shape[0]} (image {image.shape}, grid {grid.shape})"
        )
    # Symbolic sizes (jax.export) are >= 1 by construction; only concrete ones are checked.
    if any(isinstance(d, int) and d < 1 for d in image.shape[1:3]):
        raise ValueError(f"{fn_name}: image must have H, W >= 1, got shape {image.shape}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"{fn_name}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}"
        )
    if not isinstance(align_corners, bool):
        raise TypeError(f"{fn_name}: align_corners must be a bool, got {align_corners!r}")
    return image, grid


# ---------------------------------------------------------------------------------------------
# Bilinear sampler (the gather path)
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _bilinear(image, grid, padding_mode, align_corners):
    return _reference.bilinear(image, grid, padding_mode, align_corners)


def _nonzero(tangent):
    """A custom_jvp tangent, or None for a symbolic zero (whose terms need not be computed)."""
    return None if isinstance(tangent, jax.custom_derivatives.SymbolicZero) else tangent


def _bilinear_jvp(padding_mode, align_corners, primals, tangents):
    image, grid = primals
    t_image, t_grid = map(_nonzero, tangents)
    out, t_out = _reference.bilinear_with_tangent(image, grid, t_image, t_grid, padding_mode,
                                                  align_corners)
    return out, jnp.zeros_like(out) if t_out is None else t_out


_bilinear.defjvp(_bilinear_jvp, symbolic_zeros=True)


# Compiled once per shape and options, so eager calls do not dispatch dozens of small ops;
# inside a caller's jit it is inlined.
_bilinear_jit = jax.jit(_bilinear, static_argnums=(2, 3))


def _flat_points(grid):
    """(B, *S, 2) -> (B, N, 2), with N spelled out so that a batch of 0 reshapes too."""
    return grid.reshape((grid.shape[0], math.prod(grid.shape[1:-1]), 2))


def bilinear_sample(
    image: ArrayLike,
    grid: ArrayLike,
    *,
    padding_mode: str = "zeros",
    align_corners: bool = False,
    method: str = "auto",
) -> jax.Array:
    """Bilinear sampling of an image at a grid of normalised points, eq. (5) of the paper.

    Equivalent to ``torch.nn.functional.grid_sample(mode="bilinear")`` in NHWC. Derivatives flow
    to the image (eq. 6) and to the grid (eq. 7) through hand-written rules, in forward and
    reverse mode; at exact integer coordinates the grid derivative is the one-sided (floor)
    one, as in torch.

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
        "auto" (default): the native C++ kernel when the program runs on a CPU and the kernel
        can be built (first use compiles it, once per machine), else "gather"; a program
        exported with ``jax.export`` takes "gather", so it runs anywhere. "gather": pure JAX,
        one gather, and one scatter-add for the image gradient. "native": force the C++
        kernel on CPU (the gather path elsewhere; exportable by opt-in, see
        :func:`register_native_kernels`). "separable": two matrix products for axis-aligned
        grids (attention, eq. 2), falling back to "gather" at run time for other grids.
        bf16/f16 operands run the native kernel in float32. See ``stn_jax._fast_paths``.

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
    out = _bilinear_jit(image, _flat_points(grid), padding_mode, align_corners)
    return out.reshape(grid.shape[:-1] + image.shape[-1:])


# ---------------------------------------------------------------------------------------------
# Nearest sampler
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _nearest(image, grid, padding_mode, align_corners):
    return _reference.nearest_with_tangent(image, grid, None, padding_mode, align_corners)[0]


def _nearest_jvp(padding_mode, align_corners, primals, tangents):
    image, grid = primals
    t_image = _nonzero(tangents[0])
    out, t_out = _reference.nearest_with_tangent(image, grid, t_image, padding_mode,
                                                 align_corners)
    return out, jnp.zeros_like(out) if t_out is None else t_out


_nearest.defjvp(_nearest_jvp, symbolic_zeros=True)
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
    out = _nearest_jit(image, _flat_points(grid), padding_mode, align_corners)
    return out.reshape(grid.shape[:-1] + image.shape[-1:])


def register_native_kernels() -> tuple[str, ...]:
    """Builds (once per machine), loads and registers the native CPU kernels with XLA.

    Only needed to run a program exported with ``method="native"`` (``jax.export``) in a process
    that has not sampled with the native kernel yet; ``method="auto"`` exports the portable
    gather path and needs nothing. Exporting the native kernel is an opt-in: its custom calls
    have no compatibility guarantee, so list them in ``disabled_checks``.

    Returns:
      The names of the FFI targets (custom calls) it registered.

    Raises:
      RuntimeError: the kernels cannot be built or loaded (no C++ compiler,
        ``STN_JAX_NATIVE=0``); the message says why.

    Example (not run as a doctest: it needs a C++ compiler; tests/test_composability.py runs it):
      >>> import jax, jax.numpy as jnp, stn_jax
      >>> f = lambda i, g: stn_jax.bilinear_sample(i, g, method="native")
      >>> targets = stn_jax.register_native_kernels()  # doctest: +SKIP
      >>> targets  # doctest: +SKIP
      ('stn_jax_bilinear_forward', 'stn_jax_bilinear_backward')
      >>> exported = jax.export.export(jax.jit(f), disabled_checks=[  # doctest: +SKIP
      ...     jax.export.DisabledSafetyCheck.custom_call(t) for t in targets])(
      ...     jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 2, 2)))
      >>> blob = exported.serialize()  # doctest: +SKIP
    """
    if not _native.load():
        raise RuntimeError(f"stn_jax native kernels unavailable: {_native.error()}")
    return (_native.FORWARD_TARGET, _native.BACKWARD_TARGET)

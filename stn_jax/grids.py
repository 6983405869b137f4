"""Grid generators: where each output pixel of a spatial transformer reads the input.

Every generator returns a sampling grid of shape (B, H', W', 2) holding, for every output pixel,
the normalised (x, y) point of the input to sample ("pull" sampling): x runs along the width, y
along the height, and -1 / +1 are the edges of the input. The conventions are exactly those of
``torch.nn.functional.affine_grid`` / ``grid_sample`` so results can be checked against torch:

* ``align_corners=True``: -1 and +1 are the centres of the corner pixels.
* ``align_corners=False``: -1 and +1 are the outer edges of the corner pixels, so the output
  pixel centres sit at ``linspace(-1, 1, S) * (S - 1) / S``.

The paper (Sect. 3.2) writes every transform as T = M_theta B: a parameter matrix applied to a
fixed basis of the output grid. :func:`linear_grid` is that product; the affine and thin plate
spline grids are instances of it with the bases :func:`affine_basis` and :func:`tps_basis`.

This module depends on jax and numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "KINDS",
    "affine_basis",
    "affine_grid",
    "attention_grid",
    "default_control_points",
    "identity_params",
    "linear_grid",
    "projective_grid",
    "regular_grid",
    "tps_basis",
    "tps_grid",
]

KINDS = ("affine", "attention", "projective", "tps")

# Smallest |w| the projective division may see: a point at (or beyond) infinity then maps far
# outside the image, where the sampler reads zeros, instead of producing inf or NaN.
_PROJECTIVE_EPS = 1e-6

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_out_shape(out_shape) -> tuple[int, int]:
    if (
        not isinstance(out_shape, Sequence)
        or len(out_shape) != 2
        or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in out_shape)
    ):
        raise ValueError(f"out_shape must be (H', W') with two positive ints, got {out_shape!r}")
    return int(out_shape[0]), int(out_shape[1])


def _float_array(x: ArrayLike, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
            x = x.astype(jnp.result_type(float))
        else:
            raise TypeError(f"{name} must be a real float array, got dtype {x.dtype}")
    return x


def _linspace(size: int, align_corners: bool, dtype, xp=jnp):
    """Normalised pixel-centre positions along one axis (torch's affine_grid base axis)."""
    if size == 1:
        return xp.zeros((1,), dtype)
    axis = xp.linspace(-1.0, 1.0, size, dtype=dtype)
    if not align_corners:
        axis = axis * ((size - 1) / size)
    return axis


def _regular_grid(out_shape, align_corners, dtype, xp=jnp):
    h, w = _check_out_shape(out_shape)
    xs = _linspace(w, align_corners, dtype, xp)
    ys = _linspace(h, align_corners, dtype, xp)
    return xp.stack(xp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)


def regular_grid(
    out_shape: Sequence[int], *, align_corners: bool = False, dtype=jnp.float32
) -> jax.Array:
    """The identity sampling grid G of the output (the regular grid of Sect. 3.2).

    Args:
      out_shape: (H', W') of the output.
      align_corners: pixel-centre convention, see the module docstring.
      dtype: float dtype of the result.

    Returns:
      (H', W', 2) array; ``grid[i, j] = (x_j, y_i)``, normalised.

    Example:
      >>> regular_grid((2, 3), align_corners=True)[0]
      Array([[-1., -1.],
             [ 0., -1.],
             [ 1., -1.]], dtype=float32)
    """
    return _regular_grid(out_shape, align_corners, dtype)


def affine_basis(
    out_shape: Sequence[int], *, align_corners: bool = False, dtype=jnp.float32
) -> jax.Array:
    """The homogeneous basis B = (x, y, 1) of the output grid, shape (H', W', 3).

    With :func:`linear_grid` it gives the affine grid of eq. (1): ``linear_grid(theta,
    affine_basis(out_shape)) == affine_grid(theta, out_shape)``.

    Example:
      >>> affine_basis((1, 2), align_corners=True)[0]
      Array([[-1.,  0.,  1.],
             [ 1.,  0.,  1.]], dtype=float32)
    """
    grid = regular_grid(out_shape, align_corners=align_corners, dtype=dtype)
    return jnp.concatenate([grid, jnp.ones(grid.shape[:-1] + (1,), dtype)], axis=-1)


def linear_grid(matrix: ArrayLike, basis: ArrayLike) -> jax.Array:
    """The general grid of the paper, T = M_theta B (Sect. 3.2).

    ``grid[b, ..., i] = sum_d matrix[b, i, d] * basis[..., d]``, computed at full float
    precision (no TF32 / bf16 passes on accelerators).

    Args:
      matrix: (B, 2, D) parameter matrix M_theta.
      basis: (*S, D) basis of the output grid, e.g. :func:`affine_basis` (D = 3) or
        :func:`tps_basis` (D = K).

    Returns:
      (B, *S, 2) sampling grid.

    Example:
      >>> theta = jnp.array([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # shift right by 0.5
      >>> linear_grid(theta, affine_basis((1, 3), align_corners=True))[0, 0]
      Array([[-0.5,  0. ],
             [ 0.5,  0. ],
             [ 1.5,  0. ]], dtype=float32)
    """
    matrix = _float_array(matrix, "matrix")
    basis = _float_array(basis, "basis")
    if matrix.ndim != 3 or matrix.shape[1] != 2:
        raise ValueError(f"matrix must have shape (B, 2, D), got {matrix.shape}")
    if basis.ndim < 1 or basis.shape[-1] != matrix.shape[2]:
        raise ValueError(
            f"basis must have shape (*S, {matrix.shape[2]}) to match matrix {matrix.shape}, "
            f"got {basis.shape}"
        )
    return jnp.einsum("...d,bid->b...i", basis, matrix, precision=_HIGHEST)


def affine_grid(
    theta: ArrayLike, out_shape: Sequence[int], *, align_corners: bool = False
) -> jax.Array:
    """Sampling grid of an affine transform, eq. (1); ``torch.nn.functional.affine_grid``.

    Args:
      theta: (B, 2, 3) matrices mapping output points (x_t, y_t, 1) to input points (x_s, y_s).
      out_shape: (H', W') of the output.
      align_corners: pixel-centre convention, see the module docstring.

    Returns:
      (B, H', W', 2) grid of normalised (x, y) input points.

    Example:
      >>> theta = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # identity
      >>> affine_grid(theta, (28, 28)).shape
      (1, 28, 28, 2)
    """
    theta = _float_array(theta, "theta")
    if theta.ndim != 3 or theta.shape[1:] != (2, 3):
        raise ValueError(f"theta must have shape (B, 2, 3), got {theta.shape}")
    basis = affine_basis(out_shape, align_corners=align_corners, dtype=theta.dtype)
    return linear_grid(theta, basis)


def attention_grid(
    params: ArrayLike, out_shape: Sequence[int], *, align_corners: bool = False
) -> jax.Array:
    """Sampling grid of the attention transform, eq. (2): isotropic scale and translation.

    Args:
      params: (B, 3) rows (s, tx, ty); the grid is A = [[s, 0, tx], [0, s, ty]] applied to the
        output grid, so s < 1 zooms in on a window of half-size s centred at (tx, ty).
      out_shape: (H', W') of the output.
      align_corners: pixel-centre convention, see the module docstring.

    Returns:
      (B, H', W', 2) grid.

    Example:
      >>> crop = attention_grid(jnp.array([[0.5, -0.5, -0.5]]), (14, 14))  # top-left quarter
    """
    params = _float_array(params, "params")
    if params.ndim != 2 or params.shape[1] != 3:
        raise ValueError(f"params must have shape (B, 3) = (s, tx, ty), got {params.shape}")
    base = regular_grid(out_shape, align_corners=align_corners, dtype=params.dtype)
    scale = params[:, None, None, 0:1]
    shift = params[:, None, None, 1:3]
    return base[None] * scale + shift


def projective_grid(
    params: ArrayLike, out_shape: Sequence[int], *, align_corners: bool = False
) -> jax.Array:
    """Sampling grid of a plane projective transform (homography).

    The output point (x, y) maps to (u / w, v / w) with (u, v, w) = M (x, y, 1).
    Where |w| < 1e-6 (the point is at or behind infinity) w is replaced by +-1e-6 with the sign
    of w (+ at 0): the point then lies far outside the image, which the samplers read as padding,
    and neither the grid nor its gradient holds inf or NaN.

    Args:
      params: (B, 8), the first 8 row-major entries of M with M[2, 2] = 1, or (B, 3, 3) matrices.
      out_shape: (H', W') of the output.
      align_corners: pixel-centre convention, see the module docstring.

    Returns:
      (B, H', W', 2) grid.

    Example:
      >>> ident = jnp.array([[1.0, 0, 0, 0, 1, 0, 0, 0]])
      >>> projective_grid(ident, (4, 4)).shape
      (1, 4, 4, 2)
    """
    params = _float_array(params, "params")
    if params.ndim == 2 and params.shape[1] == 8:
        ones = jnp.ones((params.shape[0], 1), params.dtype)
        matrix = jnp.concatenate([params, ones], axis=1).reshape(-1, 3, 3)
    elif params.ndim == 3 and params.shape[1:] == (3, 3):
        matrix = params
    else:
        raise ValueError(f"params must have shape (B, 8) or (B, 3, 3), got {params.shape}")
    basis = affine_basis(out_shape, align_corners=align_corners, dtype=params.dtype)
    uvw = jnp.einsum("...d,bid->b...i", basis, matrix, precision=_HIGHEST)
    w = uvw[..., 2:3]
    w_safe = jnp.where(jnp.abs(w) < _PROJECTIVE_EPS, jnp.where(w < 0, -_PROJECTIVE_EPS, _PROJECTIVE_EPS), w)
    return uvw[..., :2] / w_safe


def default_control_points(grid_size: int = 4, *, dtype=jnp.float32) -> jax.Array:
    """A regular ``grid_size`` x ``grid_size`` lattice of control points over [-1, 1]^2.

    Returns:
      (grid_size**2, 2) points (x, y), row-major: y outer, x inner.

    Example:
      >>> default_control_points(2)
      Array([[-1., -1.],
             [ 1., -1.],
             [-1.,  1.],
             [ 1.,  1.]], dtype=float32)
    """
    if not isinstance(grid_size, (int, np.integer)) or grid_size < 2:
        raise ValueError(f"grid_size must be an int >= 2, got {grid_size!r}")
    axis = jnp.linspace(-1.0, 1.0, grid_size, dtype=dtype)
    xs, ys = jnp.meshgrid(axis, axis)
    return jnp.stack([xs.ravel(), ys.ravel()], axis=-1)


def _tps_kernel(d2, xp=jnp):
    """U(r) = r^2 log r^2 from the squared distance, with U(0) = 0 and a finite gradient at 0."""
    positive = d2 > 0
    return xp.where(positive, d2 * xp.log(xp.where(positive, d2, 1.0)), 0.0)


def _pairwise_kernel(points, centres, xp=jnp):
    # Squared distance without a sqrt, so the gradient at r = 0 is finite.
    diff = points[..., None, :] - centres
    return _tps_kernel(xp.sum(diff * diff, axis=-1), xp)


def _tps_basis_math(out_shape, cps, align_corners, xp):
    """The basis of :func:`tps_basis` in numpy (float64, concrete points) or jnp (traceable)."""
    k = cps.shape[0]
    p = xp.concatenate([xp.ones((k, 1), cps.dtype), cps], axis=1)  # (K, 3)
    system = xp.concatenate(
        [
            xp.concatenate([_pairwise_kernel(cps, cps, xp), p], axis=1),
            xp.concatenate([p.T, xp.zeros((3, 3), cps.dtype)], axis=1),
        ],
        axis=0,
    )
    # L^-1 restricted to the K value columns; jnp.linalg.solve is differentiable in cps.
    rhs = xp.concatenate([xp.eye(k, dtype=cps.dtype), xp.zeros((3, k), cps.dtype)], axis=0)
    coeffs = xp.linalg.solve(system, rhs)  # (K + 3, K)
    q = _regular_grid(out_shape, align_corners, cps.dtype, xp)
    features = xp.concatenate(
        [_pairwise_kernel(q, cps, xp), xp.ones(q.shape[:-1] + (1,), cps.dtype), q], axis=-1
    )
    if xp is np:
        return features @ coeffs
    return jnp.einsum("hwd,dk->hwk", features, coeffs, precision=_HIGHEST)


def _check_tps_geometry(points: np.ndarray, dtype) -> None:
    """Raises ValueError if concrete (K, 2) control points repeat a point or lie on one line.

    Either makes the TPS system singular (the grid then reaches ~1e15, or the solve fails).
    "Repeat" and "line" are up to the rounding of the points' dtype, relative to their spread.
    """
    rtol = 16 * float(jnp.finfo(dtype).eps)
    points = np.asarray(points, np.float64)
    if not np.all(np.isfinite(points)):
        raise ValueError("control_points must be finite")
    extent = float(np.max(np.ptp(points, axis=0)))
    diff = points[:, None, :] - points[None, :, :]
    dist = np.sqrt(np.sum(diff * diff, axis=-1)) + np.diag(np.full(len(points), np.inf))
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    if dist[i, j] <= rtol * extent or extent == 0:
        i, j = min(i, j), max(i, j)
        raise ValueError(
            f"control_points must be distinct: points {i} and {j} are both at "
            f"{tuple(points[i].tolist())}; the thin plate spline through them is undefined"
        )
    # Collinear: the centred points have (numerically) rank 1, so the affine part x, y of the
    # spline is not determined.
    singular = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    if singular[1] <= rtol * singular[0]:
        raise ValueError(
            "control_points must not all lie on one line (the affine part of the thin plate "
            f"spline is then undetermined); got {len(points)} collinear points"
        )


def _check_control_points(control_points, dtype) -> jax.Array:
    if control_points is None:
        return default_control_points(4, dtype=dtype)
    control_points = _float_array(control_points, "control_points")
    if control_points.ndim != 2 or control_points.shape[1] != 2 or control_points.shape[0] < 3:
        raise ValueError(
            f"control_points must have shape (K, 2) with K >= 3, got {control_points.shape}"
        )
    # Traced points (learned inside jit) have no values to check here.
    if not isinstance(control_points, jax.core.Tracer):
        _check_tps_geometry(control_points, control_points.dtype)
    return control_points


def tps_basis(
    out_shape: Sequence[int],
    *,
    control_points: ArrayLike | None = None,
    align_corners: bool = False,
) -> jax.Array:
    """The thin plate spline basis of the output grid: grid = basis @ params.

    A thin plate spline through the K control points c_k (in output coordinates) with values
    p_k (the input points they land on) is f(q) = a0 + a1 x + a2 y + sum_k w_k U(|q - c_k|),
    U(r) = r^2 log r^2, with (w, a) from the closed-form system
    [[K, P], [P^T, 0]] [w; a] = [p; 0]. Since (w, a) is linear in p, f over the output grid is
    ``basis @ p`` with ``basis = [U(q, c) | 1 | x | y] @ L^-1[:, :K]``, differentiable in the
    control points (so the target grid can be learned) and free of NaN at r = 0.

    Args:
      out_shape: (H', W') of the output.
      control_points: (K, 2) positions of the control points in the output grid, normalised
        (x, y); default :func:`default_control_points` (4 x 4).
      align_corners: pixel-centre convention, see the module docstring.

    Returns:
      (H', W', K) basis.

    Raises:
      ValueError: control_points not of shape (K, 2) with K >= 3, or (when concrete, i.e. not
        traced inside jit) two of them coincide or all lie on one line: the spline through them
        is undefined.

    Example:
      >>> basis = tps_basis((8, 8))                   # default 4 x 4 control points
      >>> basis.shape, bool(jnp.allclose(basis.sum(-1), 1.0, atol=1e-5))  # an affine partition
      ((8, 8, 16), True)
    """
    if control_points is None:
        # The default 4 x 4 lattice of default_control_points, exactly in float64.
        cps = np.stack(np.meshgrid(np.linspace(-1, 1, 4), np.linspace(-1, 1, 4)), -1).reshape(-1, 2)
        dtype = jnp.float32
    else:
        dtype = jnp.asarray(control_points).dtype
        cps = _check_control_points(control_points, dtype)
    if not isinstance(cps, jax.core.Tracer):
        # Concrete points (the usual case, also inside jit): solve once in float64, so that
        # params == control_points is the identity to float32 rounding.
        basis = _tps_basis_math(out_shape, np.asarray(cps, np.float64), align_corners, np)
        return jnp.asarray(basis, dtype)
    return _tps_basis_math(out_shape, cps, align_corners, jnp)


def tps_grid(
    params: ArrayLike,
    out_shape: Sequence[int],
    *,
    control_points: ArrayLike | None = None,
    align_corners: bool = False,
) -> jax.Array:
    """Sampling grid of a thin plate spline (the paper's TPS transform).

    Args:
      params: (B, K, 2): where each of the K control points lands in the input, normalised (x, y).
        ``params == control_points`` is the identity.
      out_shape: (H', W') of the output.
      control_points: (K, 2) positions of the control points in the output grid; default a
        regular 4 x 4 lattice over [-1, 1]^2 (:func:`default_control_points`).
        Differentiable: pass a learned array to learn the target grid.
      align_corners: pixel-centre convention, see the module docstring.

    Returns:
      (B, H', W', 2) grid.

    Raises:
      ValueError: params and control_points disagree in shape, or concrete control_points
        repeat a point or all lie on one line (see :func:`tps_basis`).

    Example:
      >>> cps = default_control_points(4)
      >>> grid = tps_grid(cps[None] + 0.05, (28, 28))  # a pure shift by 0.05
    """
    params = _float_array(params, "params")
    if params.ndim != 3 or params.shape[2] != 2:
        raise ValueError(f"params must have shape (B, K, 2), got {params.shape}")
    k = 16 if control_points is None else _check_control_points(control_points, params.dtype).shape[0]
    if k != params.shape[1]:
        raise ValueError(
            f"params has {params.shape[1]} points but control_points has {k}: "
            f"params must have shape (B, {k}, 2)"
        )
    basis = tps_basis(out_shape, control_points=control_points, align_corners=align_corners)
    return linear_grid(jnp.swapaxes(params, 1, 2), basis.astype(params.dtype))


def identity_params(
    kind: str,
    *,
    batch_size: int | None = None,
    control_points: ArrayLike | None = None,
    dtype=jnp.float32,
) -> jax.Array:
    """The parameters of the identity transform for a grid kind.

    Args:
      kind: "affine" -> (2, 3); "attention" -> (3,) = (1, 0, 0); "projective" -> (8,);
        "tps" -> (K, 2), the control points themselves.
      batch_size: if given, a leading batch axis of this size is added.
      control_points: for "tps" only: (K, 2) control points (default 4 x 4).
      dtype: float dtype of the result.

    Example:
      >>> identity_params("affine", batch_size=2).shape
      (2, 2, 3)
    """
    if kind == "affine":
        params = jnp.eye(2, 3, dtype=dtype)
    elif kind == "attention":
        params = jnp.array([1.0, 0.0, 0.0], dtype)
    elif kind == "projective":
        params = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype)
    elif kind == "tps":
        params = _check_control_points(control_points, dtype).astype(dtype)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != "tps" and control_points is not None:
        raise ValueError(f"control_points applies to kind='tps' only, got kind={kind!r}")
    if batch_size is not None:
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        params = jnp.broadcast_to(params, (batch_size,) + params.shape)
    return params

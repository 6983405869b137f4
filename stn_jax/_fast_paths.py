"""Fast paths of ``bilinear_sample``: the native CPU kernel and the separable (axis-aligned) warp.

Every path computes exactly what the pure-JAX reference in :mod:`stn_jax._reference` computes
(``method="gather"``: one gather of the 4 taps, one scatter-add into the image gradient), the
same values and the same derivatives to the image and the grid, in every padding mode and with
both ``align_corners``; the tests compare them with the reference.

``method`` of :func:`stn_jax.bilinear_sample`:

* ``"auto"`` (default): ``"native"`` when the default backend is the CPU, the native kernels
  are available (:func:`stn_jax._native.available`) and the operands are floats the kernel
  takes (float32 or float64 pairs; bf16/f16 run in float32); otherwise ``"gather"``. The
  platform is chosen when the function is lowered, so a function jitted for another device
  takes the gather, and so does a function lowered for ``jax.export`` (portable by default).
* ``"gather"``: the pure-JAX reference.
* ``"native"``: the C++ kernels through the XLA FFI (CPU; the gather path on other platforms).
  Forward and backward are each one pass over the output points, parallel over the XLA
  intra-op thread pool; the image gradient is accumulated per image by one thread, so it is
  deterministic. Under batch sharding each device runs the kernel on its own images
  (``custom_partitioning``). Exported only when asked for (``method="native"``), and then the
  loading process calls :func:`stn_jax.register_native_kernels`.
* ``"separable"``: for axis-aligned grids (every row of the grid has the same x, every column
  the same y; the attention transform of eq. (2), or an affine map without rotation or shear)
  the warp is two batched matrix products with tent-weight matrices, without gather or scatter,
  the form that suits TPUs. A grid that is not separable (checked at run time) takes the gather
  path, so the result is always right. Needs a grid of shape (B, H', W', 2).

How the native kernel composes with JAX: one primitive, ``stn_jax_native_bilinear``, with three
kinds. "forward" samples; its JVP is the "tangent" kind, linear in the tangents of image and
grid (the kernel's forward on the image tangent plus the reference's grid term); the transpose
of "tangent" is "backward", the kernel's hand-written VJP, and the transpose of "backward" is
"tangent". So reverse mode runs the native backward as before, forward mode the native forward,
and the derivatives of "tangent" and "backward" with respect to image and grid (grad of grad,
hessians) are those of the reference. vmap folds the mapped axis into the batch.

This module depends on jax, numpy and absl-py (one log line naming the chosen path).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from stn_jax import _native, _reference

__all__ = ["METHODS", "bilinear", "bilinear_jit", "native_dtype", "resolve_method"]

METHODS = ("auto", "gather", "native", "separable")

_PADDING_CODES = {"zeros": 0, "border": 1, "reflection": 2}
_HIGHEST = jax.lax.Precision.HIGHEST
_LOW_PRECISION = (jnp.bfloat16, jnp.float16, jnp.float32)


def native_dtype(image: jax.Array, grid: jax.Array):
    """The dtype the native kernel runs these operands in, or None if it does not take them.

    float64 image and grid run in float64; any mix of float32, bf16 and f16 runs in float32
    (float32 coordinates and accumulation, as in the gather path).
    """
    if image.dtype == grid.dtype == jnp.float64:
        return jnp.dtype(jnp.float64)
    if image.dtype in _LOW_PRECISION and grid.dtype in _LOW_PRECISION:
        return jnp.dtype(jnp.float32)
    return None


_logged: set = set()


def _log_once(key, message, *args):
    if key not in _logged:
        _logged.add(key)
        logging.info(message, *args)


def _auto_choice(image, grid) -> str:
    """Resolves "auto"; logs, once per reason, which path runs and why."""
    backend = jax.default_backend()
    if backend != "cpu":
        _log_once("accelerator", "stn_jax bilinear_sample: gather path (the default backend is "
                  "%s; the native kernel is CPU-only)", backend)
        return "gather"
    if native_dtype(image, grid) is None:
        _log_once(("dtype", image.dtype, grid.dtype), "stn_jax bilinear_sample: gather path for "
                  "image %s and grid %s (the native kernel takes float32 or float64 pairs, and "
                  "bf16/f16)", image.dtype, grid.dtype)
        return "gather"
    if not _native.available():
        _log_once("unavailable", "stn_jax bilinear_sample: gather path, the native kernel is "
                  "unavailable: %s", _native.error())
        return "gather"
    _log_once("native", "stn_jax bilinear_sample: native CPU kernel (%s)", _native.library())
    return "auto-native"


def resolve_method(method: str, image: jax.Array, grid: jax.Array) -> str:
    """Checks ``method`` and resolves it for these operands.

    Returns:
      "gather", "separable", "native", or "auto-native" (native on CPU, gather elsewhere and
      when exported).

    Raises:
      ValueError: an unknown method, or "native" for operands it does not take.
      RuntimeError: "native" when the native kernels cannot be built or loaded.
    """
    if method not in METHODS:
        raise ValueError(f"bilinear_sample: method must be one of {METHODS}, got {method!r}")
    if method == "native":
        if native_dtype(image, grid) is None:
            raise ValueError(
                "bilinear_sample: method='native' needs float32 or float64 image and grid (or "
                f"bf16/f16, run in float32); got image {image.dtype}, grid {grid.dtype}"
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
        return _auto_choice(image, grid)
    return method


def bilinear(image, grid, padding_mode: str, align_corners: bool, method: str, reference):
    """Samples with a resolved method (not "gather"); image (B, H, W, C), grid (B, *S, 2).

    ``reference(image, flat_grid, padding_mode, align_corners)`` is the gather path on a
    (B, N, 2) grid, the fallback of "separable".
    """
    if method in ("native", "auto-native"):
        dtype = native_dtype(image, grid)
        out = _bind(image.astype(dtype), grid.astype(dtype), kind="forward",
                             padding_mode=padding_mode, align_corners=align_corners,
                             portable_export=method == "auto-native")[0]
        return out.astype(image.dtype)
    if method == "separable":
        b, c = image.shape[0], image.shape[-1]
        out_shape = grid.shape[:-1] + (c,)

        def gather(i, g):
            flat = g.reshape(b, math.prod(g.shape[1:-1]), 2)
            return reference(i, flat, padding_mode, align_corners).reshape(out_shape)

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


def _varying(x) -> frozenset:
    """The shard_map axes x varies over (its type's "vma"; where it lives moved across jax
    versions)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _varying_like(out, *inputs):
    """Marks out as varying over the shard_map axes its inputs vary over (the FFI result types
    carry none, and a custom rule's outputs must match its inputs' types)."""
    vma = frozenset().union(*map(_varying, inputs))
    missing = tuple(sorted(vma - _varying(out)))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


def _ffi_forward(image, grid, padding_mode, align_corners):
    """image (B, H, W, C), grid (B, *S, 2) -> (B, *S, C)."""
    call = jax.ffi.ffi_call(
        _native.FORWARD_TARGET,
        jax.ShapeDtypeStruct(grid.shape[:-1] + image.shape[-1:], image.dtype),
        # The kernel treats every leading dimension as batch, so vmap only adds one.
        vmap_method="broadcast_all",
    )
    out = call(image, grid, padding=np.int32(_PADDING_CODES[padding_mode]),
               align_corners=bool(align_corners))
    return _varying_like(out, image, grid)


def _ffi_backward(image, grid, cotangent, padding_mode, align_corners):
    call = jax.ffi.ffi_call(
        _native.BACKWARD_TARGET,
        (jax.ShapeDtypeStruct(image.shape, image.dtype), jax.ShapeDtypeStruct(grid.shape, grid.dtype)),
        vmap_method="broadcast_all",
    )
    d_image, d_grid = call(image, grid, cotangent, padding=np.int32(_PADDING_CODES[padding_mode]),
                           align_corners=bool(align_corners))
    return (_varying_like(d_image, image, grid, cotangent),
            _varying_like(d_grid, image, grid, cotangent))


@functools.lru_cache(maxsize=None)
def _partitioned(kind, grid_rank, padding_mode, align_corners):
    """The FFI call of `kind` ("forward" or "backward") split over the batch of a sharded
    program: each device runs the kernel on its own images, nothing is gathered.

    Every other dimension is replicated (the image gradient sums over all points of an image,
    the grid gradient over its channels).
    """
    points = " ".join(f"s{i}" for i in range(grid_rank - 2))
    image, grid, out = "b h w c", f"b {points} k", f"b {points} c"
    if kind == "forward":
        def fn(image, grid):
            return _ffi_forward(image, grid, padding_mode, align_corners)

        rule = f"{image}, {grid} -> {out}"
        n_in, n_out = 2, 1
    else:
        def fn(image, grid, cotangent):
            return _ffi_backward(image, grid, cotangent, padding_mode, align_corners)

        rule = f"{image}, {grid}, {out} -> {image}, {grid}"
        n_in, n_out = 3, 2

    def shardings(mesh, arg_shapes):
        spec = arg_shapes[1].sharding.spec  # the grid's batch axis decides
        batch = NamedSharding(mesh, PartitionSpec(spec[0] if len(spec) else None))
        return batch, (batch,) * n_in, batch if n_out == 1 else (batch,) * n_out

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        _, args, outs = shardings(mesh, arg_shapes)
        return mesh, fn, outs, args

    def infer(mesh, arg_shapes, result_shape):
        del result_shape
        return shardings(mesh, arg_shapes)[2]

    wrapped = custom_partitioning(fn)
    wrapped.def_partition(
        partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
        # In order of first appearance, as the verifier wants them.
        need_replication_factors=tuple(
            f for f in dict.fromkeys(rule.replace(",", " ").replace("->", " ").split())
            if f != "b"),
    )
    return wrapped


def _native_impl(*args, kind, padding_mode, align_corners, split):
    """What the primitive computes on CPU: the kernels, split over the batch if `split`."""
    image, grid = args[:2]
    if split:
        forward = _partitioned("forward", grid.ndim, padding_mode, align_corners)
        backward = _partitioned("backward", grid.ndim, padding_mode, align_corners)
    else:
        def forward(image, grid):
            return _ffi_forward(image, grid, padding_mode, align_corners)

        def backward(image, grid, cotangent):
            return _ffi_backward(image, grid, cotangent, padding_mode, align_corners)
    if kind == "forward":
        return (forward(image, grid),)
    if kind == "backward":
        return tuple(backward(*args))
    t_image, t_grid = args[2:]
    # The image term on the kernel; the grid term (forward mode only) from the reference.
    grid_term = _reference_tangent(image, grid, None, t_grid, padding_mode, align_corners)
    return (forward(t_image, grid) + grid_term,)


def _reference_tangent(image, grid, t_image, t_grid, padding_mode, align_corners):
    """The gather path's tangent on a (B, *S, 2) grid (t_image may be None)."""
    b, c = image.shape[0], image.shape[-1]
    n = math.prod(grid.shape[1:-1])
    _, t_out = _reference.bilinear_with_tangent(
        image, grid.reshape(b, n, 2), t_image, t_grid.reshape(b, n, 2), padding_mode,
        align_corners)
    return t_out.reshape(grid.shape[:-1] + (c,))


def _reference_backward(image, grid, cotangent, padding_mode, align_corners):
    """The gather path's VJP on a (B, *S, 2) grid: the transpose of its tangent."""
    transpose = jax.linear_transpose(
        lambda ti, tg: _reference_tangent(image, grid, ti, tg, padding_mode, align_corners),
        image, grid)
    return transpose(cotangent)


def _reference_impl(*args, kind, padding_mode, align_corners):
    """What the primitive computes elsewhere and when exported portably: the gather path."""
    image, grid = args[:2]
    if kind == "forward":
        b, c = image.shape[0], image.shape[-1]
        n = math.prod(grid.shape[1:-1])
        out = _reference.bilinear(image, grid.reshape(b, n, 2), padding_mode, align_corners)
        return (out.reshape(grid.shape[:-1] + (c,)),)
    if kind == "backward":
        return tuple(_reference_backward(*args, padding_mode, align_corners))
    return (_reference_tangent(*args, padding_mode, align_corners),)


_native_p = Primitive("stn_jax_native_bilinear")
_native_p.multiple_results = True


def _abstract_eval(*avals, kind, **_):
    # _bind gives every operand the same varying shard_map axes, so the outputs copy them.
    image, grid = avals[:2]
    if kind == "backward":
        return image, grid
    spec = tuple(grid.sharding.spec) + (None,) * (grid.ndim - len(grid.sharding.spec))
    # The output is laid out like the grid's points: sharded as they are, channels whole.
    sharding = grid.sharding.update(spec=spec[:-1] + (None,))
    shape = grid.shape[:-1] + image.shape[-1:]
    return (grid.update(shape=shape, dtype=image.dtype, sharding=sharding),)


@functools.lru_cache(maxsize=None)
def _eager(**params):
    return jax.jit(functools.partial(_native_p.bind, **params))


_native_p.def_abstract_eval(_abstract_eval)
_native_p.def_impl(lambda *args, **params: _eager(**params)(*args))


def _spans_devices(ctx) -> bool:
    """Whether this lowering is of a program partitioned over several devices (not inside a
    shard_map over all its axes, where each device already holds only its shard)."""
    axis_context = ctx.module_context.axis_context
    devices = getattr(axis_context, "device_assignment", None)
    if devices is not None:
        return len(devices) > 1
    mesh = getattr(axis_context, "mesh", None)
    manual = set(getattr(axis_context, "manual_axes", ()))
    return mesh is not None and mesh.size > 1 and manual != set(mesh.axis_names)


def _lowering(ctx, *args, kind, padding_mode, align_corners, portable_export, platform):
    exporting = ctx.module_context.lowering_parameters.for_export
    params = dict(kind=kind, padding_mode=padding_mode, align_corners=align_corners)
    if platform == "cpu" and not (portable_export and exporting):
        fn = functools.partial(_native_impl, split=_spans_devices(ctx), **params)
    else:
        fn = functools.partial(_reference_impl, **params)
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


try:
    # The lowering on several devices wraps the kernels in custom_partitioning, which needs to
    # know the devices; jit provides them to primitives listed here.
    from jax._src import dispatch as _dispatch

    _dispatch.prim_requires_devices_during_lowering.add(_native_p)
except (ImportError, AttributeError):  # pragma: no cover - a jax without this registry
    pass
mlir.register_lowering(_native_p, functools.partial(_lowering, platform=None))
mlir.register_lowering(_native_p, functools.partial(_lowering, platform="cpu"), platform="cpu")


def _bind(*args, **params):
    # Inside shard_map, operands that vary over different axes are first made to vary alike.
    args = [_varying_like(a, *args) for a in args]
    return _native_p.bind(*args, **params)


def _jvp(primals, tangents, *, kind, **params):
    outs = _bind(*primals, kind=kind, **params)
    zero = [type(t) is ad.Zero for t in tangents]
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    if kind == "forward":
        return outs, _bind(*primals, *tangents, kind="tangent", **params)
    # "tangent" and "backward" are linear in their last operands: that part is the primitive
    # itself; the part from image and grid (second order) is the reference's.
    image, grid, *linear = primals
    t_outs = list(_bind(image, grid, *tangents[2:], kind=kind, **params))
    if not (zero[0] and zero[1]):
        ref = _reference_tangent if kind == "tangent" else _reference_backward
        pm, ac = params["padding_mode"], params["align_corners"]
        _, extra = jax.jvp(lambda i, g: ref(i, g, *linear, pm, ac), (image, grid),
                           tuple(tangents[:2]))
        extra = extra if kind == "backward" else (extra,)
        t_outs = [t + e for t, e in zip(t_outs, extra)]
    return outs, t_outs


def _transpose(cts, *args, kind, **params):
    image, grid, *linear = args
    if kind == "tangent":
        (ct,) = cts
        if type(ct) is ad.Zero:
            return [None] * len(args)
        d_image, d_grid = _bind(image, grid, ct, kind="backward", **params)
        return [None, None,
                d_image if ad.is_undefined_primal(linear[0]) else None,
                d_grid if ad.is_undefined_primal(linear[1]) else None]
    if kind == "backward":
        cts = [ad.instantiate_zeros(ct) for ct in cts]
        return [None, None, _bind(image, grid, *cts, kind="tangent", **params)[0]]
    raise ValueError("the sampler is not linear in its operands")


def _batch(args, dims, *, kind, **params):
    # Every image is sampled on its own, so a mapped axis folds into the batch.
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
    batch = args[0].shape[1]
    outs = _bind(*[a.reshape((size * batch,) + a.shape[2:]) for a in args], kind=kind, **params)
    return [o.reshape((size, batch) + o.shape[1:]) for o in outs], [0] * len(outs)


ad.primitive_jvps[_native_p] = _jvp
ad.primitive_transposes[_native_p] = _transpose
batching.primitive_batchers[_native_p] = _batch


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
    coord_dtype = jnp.promote_types(g.dtype, jnp.float32)
    g = g.astype(coord_dtype)
    finite = jnp.isfinite(g)
    g = jnp.where(finite, g, 0.0)
    g, dclamp = _reference._clamp(g, -_reference._MAX_ABS_GRID, _reference._MAX_ABS_GRID,
                                  jnp.ones_like(g))
    x, deriv = _reference._source_coord(g, size, padding_mode, align_corners)
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _separable(image, grid, padding_mode, align_corners):
    return _separable_forward(image, grid, padding_mode, align_corners)


def _separable_exact(image, grid, padding_mode, align_corners):
    """The separable warp written so that autodiff gives every derivative per grid point.

    The tent matrices come from the grid's first row and column, so differentiating them
    would credit every point's derivative to those. Instead they are built from the grid with
    its gradient stopped, and each point's offset from it (zero, with a derivative of one)
    enters through the exact expansion of a bilinear patch: out(x + dx, y + dy) = out
    + Dx dx + Dy dy + Dxy dx dy, whose coefficients are warps with the derivative matrices.
    The value is the plain warp; first derivatives are eqs. (6)-(7); second ones are right too.
    """
    fixed = jax.lax.stop_gradient(grid)
    acc_dtype, (kx, dkx, derx), (ky, dky, dery) = _separable_parts(
        image, fixed, padding_mode, align_corners
    )
    img = image.astype(acc_dtype)
    offset = (grid - fixed).astype(acc_dtype)
    dx = (offset[..., 0] * derx[:, None, :])[..., None]
    dy = (offset[..., 1] * dery[:, :, None])[..., None]
    out = (_warp(ky, kx, img) + _warp(ky, dkx, img) * dx + _warp(dky, kx, img) * dy
           + _warp(dky, dkx, img) * (dx * dy))
    return out.astype(image.dtype)


def _separable_jvp(padding_mode, align_corners, primals, tangents):
    return jax.jvp(lambda i, g: _separable_exact(i, g, padding_mode, align_corners), primals,
                   tangents)


_separable.defjvp(_separable_jvp)

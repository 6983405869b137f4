"""Layers the models share, written so that their gradients are fast on XLA's CPU backend.

Both compute exactly the standard operation (same parameters, same values to float rounding);
only the lowering differs, and only on the CPU. Each picks its form when the function is
lowered (`jax.lax.platform_dependent`): accelerators get XLA's own operation.

* Convolution. XLA's CPU convolution is fast forward but slow in its gradients. Written as an
  explicit im2col (the kh * kw shifted windows of the input, concatenated along channels) and
  one matrix product with the reshaped kernel, the forward is a matmul and the kernel gradient
  one more; the input gradient is the patches' shifted adds, or, for wide convolutions (from
  `XLA_INPUT_GRAD_MIN_CHANNELS` input channels and `XLA_INPUT_GRAD_MIN_PIXELS` output pixels),
  XLA's transposed convolution (`_patches_conv_xla_input_grad`). A kernel that covers its
  whole input (the CNN's second conv, 7x7 on 7x7) is a dense layer and is computed as one.
* 2x2 max-pooling. `nnx.max_pool` is a reduce_window whose gradient is a select_and_scatter,
  slow on the CPU; there the pool is the elementwise maximum of the four strided sub-grids,
  with a forward-mode rule (a select of each window's first maximum) whose transpose is the
  gradient: compares, selects and pads.

`docs/performance.md` ("Training step") has the measurements.

`conv_general_dilated` has the signature of `jax.lax.conv_general_dilated` and is what the
models pass to `nnx.Conv(..., conv_general_dilated=...)`. It takes the patches form when the
function is lowered for the CPU and the convolution is a plain one (stride 1, no dilation, no
feature groups, NHWC / HWIO / NHWC, padding "VALID" or explicit) whose patches stay under
`MAX_PATCH_BYTES`; everything else, and every accelerator (where cuDNN and the TPU's
convolution units win), takes `jax.lax.conv_general_dilated` itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

__all__ = ["MAX_PATCH_BYTES", "conv_general_dilated", "max_pool_2x2", "patches_conv"]

# The patches are kh * kw times the input; past this size the patches form would trade a slow
# convolution for a large allocation (e.g. a 7x7 conv on a 26x26x90 map at batch 256: 1.8 GB),
# so XLA's convolution is used instead.
MAX_PATCH_BYTES = 1 << 30

_NHWC = ("NHWC", "HWIO", "NHWC")


def patches_conv(lhs: jax.Array, rhs: jax.Array, padding=((0, 0), (0, 0))) -> jax.Array:
    """A stride-1 2-D convolution as im2col + one matrix product.

    Args:
      lhs: input (B, H, W, C).
      rhs: kernel (kh, kw, C, O) (HWIO, as `nnx.Conv` stores it).
      padding: ((top, bottom), (left, right)) zero padding of the input.

    Returns:
      (B, H + top + bottom - kh + 1, W + left + right - kw + 1, O), equal (to float rounding) to
      `jax.lax.conv_general_dilated(lhs, rhs, (1, 1), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))`.

    Example:
      >>> x, k = jnp.ones((2, 5, 5, 1)), jnp.ones((3, 3, 1, 4))
      >>> patches_conv(x, k).shape, float(patches_conv(x, k)[0, 0, 0, 0])
      ((2, 3, 3, 4), 9.0)
    """
    kh, kw, c, o = rhs.shape
    if any(p != (0, 0) for p in padding):
        lhs = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    b, h, w, _ = lhs.shape
    ho, wo = h - kh + 1, w - kw + 1
    if ho == 1 and wo == 1:
        # The kernel covers the whole (padded) input: the patches are the input itself, and the
        # convolution a dense layer. Said outright, XLA does not build and scatter back kh * kw
        # one-pixel windows.
        patches = lhs.reshape(b, kh * kw * c)
    else:
        # Window (i, j) of every output pixel, in the kernel's (kh, kw, C) order.
        windows = [lhs[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]
        patches = jnp.concatenate(windows, axis=-1).reshape(b * ho * wo, kh * kw * c)
    return (patches @ rhs.reshape(kh * kw * c, o)).reshape(b, ho, wo, o)


def _normalise_padding(padding):
    if isinstance(padding, str):
        if padding == "VALID":
            return ((0, 0), (0, 0))
        return None  # SAME etc.: left to XLA
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return padding if len(padding) == 2 and all(len(p) == 2 for p in padding) else None


def _is_unit(seq) -> bool:
    return seq is None or all(int(s) == 1 for s in seq)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, **kwargs):
    """`jax.lax.conv_general_dilated`, lowered as `patches_conv` on CPU where it applies.

    Same arguments and result as `jax.lax.conv_general_dilated`. Plain NHWC convolutions
    (stride 1, no dilation, one feature and batch group, "VALID" or explicit padding, patches of
    at most `MAX_PATCH_BYTES`) lowered for the CPU compute im2col + matmul (`patches_conv`),
    whose gradients are several times faster there; all others, and every accelerator, call
    `jax.lax.conv_general_dilated`. The platform is picked when the function is lowered
    (`jax.lax.platform_dependent`).

    Example:
      >>> from flax import nnx
      >>> conv = nnx.Conv(1, 8, kernel_size=(5, 5), padding="VALID",
      ...                 conv_general_dilated=conv_general_dilated, rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((2, 28, 28, 1))).shape
      (2, 24, 24, 8)
    """
    xla_conv = functools.partial(
        jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
    pads = _normalise_padding(padding)
    plain = (
        lhs.ndim == 4 and rhs.ndim == 4 and pads is not None
        and dimension_numbers is not None
        and (jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
        and _is_unit(window_strides) and _is_unit(lhs_dilation) and _is_unit(rhs_dilation)
        and feature_group_count == 1 and batch_group_count == 1
        and preferred_element_type is None and lhs.dtype == rhs.dtype
        and not kwargs.get("out_sharding")
    )
    if not plain:
        return xla_conv(lhs, rhs)
    kh, kw = rhs.shape[:2]
    ho = lhs.shape[1] + sum(pads[0]) - kh + 1
    wo = lhs.shape[2] + sum(pads[1]) - kw + 1
    patch_bytes = lhs.shape[0] * ho * wo * kh * kw * rhs.shape[2] * lhs.dtype.itemsize
    if min(ho, wo) < 1 or patch_bytes > MAX_PATCH_BYTES:
        return xla_conv(lhs, rhs)
    cpu = patches_conv
    if rhs.shape[2] >= XLA_INPUT_GRAD_MIN_CHANNELS and ho * wo >= XLA_INPUT_GRAD_MIN_PIXELS:
        cpu = _patches_conv_xla_input_grad
    return jax.lax.platform_dependent(
        lhs, rhs, cpu=lambda x, k: cpu(x, k, pads), default=xla_conv)


# From this many input channels on, the patches convolution's input derivative is XLA's
# convolution (`_patches_conv_xla_input_grad`); below, the patches' own (one input channel: the
# first conv of every classifier, whose XLA input gradient is a slow 1-output-channel conv).
XLA_INPUT_GRAD_MIN_CHANNELS = 16
XLA_INPUT_GRAD_MIN_PIXELS = 100


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _patches_conv_xla_input_grad(lhs, rhs, padding):
    """`patches_conv`, whose derivative in `lhs` is XLA's convolution.

    Values are `patches_conv`'s. The forward-mode rule is linear in both tangents: the kernel's
    term is the patches convolution of the input with the kernel tangent (its transpose, the
    kernel gradient, is one matrix product with the patches), the input's term is
    `jax.lax.conv_general_dilated` of the input tangent with the kernel, whose transpose (the
    input gradient) XLA computes as one convolution of the padded output gradient with the
    flipped kernel. Autodiff's transpose of the patches themselves would be a sum of kh * kw
    padded windows, which XLA fuses with whatever gradient comes before it (the CNN's pooling)
    into a loop several times slower. Only standard operations appear in the rule, so grad,
    jvp / jacfwd, grad of grad and vmap all compose.
    """
    return patches_conv(lhs, rhs, padding)


def _patches_conv_xla_input_grad_jvp(padding, primals, tangents):
    lhs, rhs = primals
    lhs_dot, rhs_dot = tangents
    out = patches_conv(lhs, rhs, padding)
    terms = []
    if not isinstance(lhs_dot, SymbolicZero):
        terms.append(jax.lax.conv_general_dilated(lhs_dot, rhs, (1, 1), padding,
                                                  dimension_numbers=_NHWC))
    if not isinstance(rhs_dot, SymbolicZero):
        terms.append(patches_conv(lhs, rhs_dot, padding))
    if not terms:
        return out, jnp.zeros_like(out)
    return out, functools.reduce(jnp.add, terms)


_patches_conv_xla_input_grad.defjvp(_patches_conv_xla_input_grad_jvp, symbolic_zeros=True)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2, ceil mode: a ragged last row or column is pooled alone.

    The same values and derivatives as `nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")`
    (which pads the high side with -inf), ties included: each window's derivative is that of
    its first maximum in row-major order, as XLA's select_and_scatter and torch's max_pool2d
    give. Lowered for the CPU it is the elementwise maximum of the four strided sub-grids, with
    a forward-mode (JVP) rule whose transpose is the gradient; lowered for anything else it is
    XLA's reduce_window (`jax.lax.platform_dependent` picks). Both take jit, grad, grad of grad,
    jvp / jacfwd and vmap.

    Args:
      x: (B, H, W, C).

    Returns:
      (B, ceil(H / 2), ceil(W / 2), C).

    Example:
      >>> x = jnp.array([[1.0, 3.0, 5.0], [2.0, 0.0, -1.0], [7.0, 7.0, 4.0]]).reshape(1, 3, 3, 1)
      >>> max_pool_2x2(x)[0, :, :, 0].tolist()
      [[3.0, 5.0], [7.0, 4.0]]
      >>> jax.grad(lambda x: max_pool_2x2(x).sum())(x)[0, :, :, 0].tolist()  # the first 7 wins
      [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
    """
    if x.ndim != 4:
        raise ValueError(f"x must have rank 4 (B, H, W, C), got shape {x.shape}")
    return jax.lax.platform_dependent(x, cpu=_max_pool_2x2, default=_xla_max_pool_2x2)


def _xla_max_pool_2x2(x):
    """XLA's reduce_window, padded with -inf on the high side: `nnx.max_pool` with "SAME"."""
    h, w = x.shape[1:3]
    # A Python -inf: JAX recognises the max monoid (and so its derivatives) by a concrete init.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                 ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))


def _pad_even(x, value):
    h, w = x.shape[1:3]
    if h % 2 or w % 2:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=value)
    return x


def _window_corners(x):
    """The four strided sub-grids of the (-inf padded) input, in row-major window order."""
    x = _pad_even(x, -jnp.inf)
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_jvp
def _max_pool_2x2(x):
    a, b, c, d = _window_corners(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


@_max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    a, b, c, d = _window_corners(x)
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    first_a = a == m
    first_b = (b == m) & ~first_a
    first_c = (c == m) & ~(first_a | first_b)
    first_d = ~(first_a | first_b | first_c)
    # (B, H, 2, W, 2, C) is the memory order of (B, 2H, 2W, C): the window's one-hot mask is
    # stacked the same way, so the tangent is one select and four slices, and its transpose
    # (the gradient) one select and four pads, with no strided scatter.
    mask = jnp.stack([jnp.stack([first_a, first_b], axis=3),
                      jnp.stack([first_c, first_d], axis=3)], axis=2)
    t = _pad_even(t, 0)
    bsz, h, w, ch = t.shape
    picked = jnp.where(mask, t.reshape(bsz, h // 2, 2, w // 2, 2, ch), 0)
    tangent = (picked[:, :, 0, :, 0] + picked[:, :, 0, :, 1]
               + picked[:, :, 1, :, 0] + picked[:, :, 1, :, 1])
    return m, tangent

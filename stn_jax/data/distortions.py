"""The distorted-MNIST generators of the paper (Sect. 4.1): R, RTS, P, E and TC.

Every generator takes a PRNG key first and a batch of digits (B, H, W, C) float in [0, 1]
(MNIST: (B, 28, 28, 1)), and returns ``(images, params)``: the distorted images
(B, canvas, canvas, C) and a dict of the sampled parameters (for tests and figures). They are
jitted (every option is static), batched over digits and deterministic for a key. They are
built from the project's own grid generators and ``bilinear_sample`` with zero padding, so a
generated image is exactly what a spatial transformer with that transform would produce.

Geometry. The generators work in *centred pixel* coordinates: (x, y) in pixels from the centre
of the image, x to the right, y DOWN (image rows). A distortion is a forward map from the
digit to the canvas; the grid holds its inverse (pull sampling: every canvas pixel reads the
digit point it came from). With ``align_corners=False`` a normalised coordinate u of an image
of size S is the centred pixel coordinate u * S / 2, which makes canvases of another size than
the digit (RTS 42x42, TC 60x60) a matter of two scale factors (`_theta_from_pixel_map`).

Angles: a positive angle rotates the digit COUNTER-CLOCKWISE as displayed (y down), like
``np.rot90``: rotating by exactly +90 degrees gives ``np.rot90(digit)``.

The distortions (numbers tagged as in docs/experiment_details.md; [S]/[?] ones are keyword
arguments with that default):

- R: rotate about the centre by U[-90, 90] degrees [P] (`rotation_deg`), optionally scale
  U[`scale_min`, `scale_max`] (default 1: none). Canvas 28.
- RTS: rotate U[-45, 45] degrees, scale U[0.7, 1.2], then translate uniformly so that the
  scaled 28x28 frame stays inside the 42x42 canvas: per axis U[-m, m] px with
  m = (canvas - scale * 28) / 2 [S].
- P: scale U[0.75, 1.0] about the centre, move each of the 4 frame corners by N(0, 5 px) per
  axis, warp by the homography that maps the 4 frame corners to the moved ones [?].
  Canvas 28 [?].
- E: scale U[0.75, 1.0], move the 16 control points of a regular 4x4 lattice over the frame by
  N(0, 1.5 px) per axis, warp with the thin plate spline through them [S for 1.5 px, ? rest].
  Canvas 28 [?].
- TC: the digit at a uniformly random integer position in a black 60x60 canvas [P], plus 6 [S]
  random 6x6 [?] crops of other digits at random integer positions; every crop is a window of
  a source digit at a uniform integer offset (mostly-blank crops are kept, as in DeepMind's
  mnist-cluttered generator). Layers combine by ``combine="add"``: sum, clipped to [0, 1], as
  mnist-cluttered does; or ``"max"``.

Example:
    >>> key, digits = jax.random.key(0), jnp.zeros((4, 28, 28, 1))  # (B, 28, 28, 1) in [0, 1]
    >>> rotate(key, digits)[0].shape                              # R
    (4, 28, 28, 1)
    >>> rotate_translate_scale(key, digits)[0].shape              # RTS
    (4, 42, 42, 1)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

import stn_jax

DISTORTIONS = ("R", "RTS", "P", "E", "TC")
COMBINE_MODES = ("add", "max")

# The paper's settings of each distortion, in one place: the generators' defaults, the data
# pipeline and the config files (configs/common.py) all read them. Tags as in
# docs/experiment_details.md: [P] the paper says so, [S] a source close to it, [?] our choice.
_SHARED_SETTINGS = {
    "rotation_deg": 0.0,  # R, RTS: angle drawn from U[-rotation_deg, rotation_deg].
    "scale_min": 1.0,  # R, RTS, P, E, TC: scale drawn from U[scale_min, scale_max].
    "scale_max": 1.0,  # Upper end of that scale range.
    "corner_std_px": 5.0,  # P: std of the corner moves in pixels [?].
    "control_std_px": 1.5,  # E: std of the TPS control point moves in pixels [S].
    "control_grid_size": 4,  # E: control points per side of the TPS lattice [P: 16 points].
    "clutter_count": 6,  # TC: clutter crops per image [S].
    "clutter_size": 6,  # TC: side of a clutter crop in pixels [?].
    "clutter_combine": "add",  # TC: add (sum clipped to [0, 1]) | max, digit and crops [?].
}
PAPER_SETTINGS = {
    name: {"canvas": own["canvas"], **_SHARED_SETTINGS, **own}
    for name, own in {
        "R": {"canvas": 28, "rotation_deg": 90.0},  # [P] 28x28, +-90 degrees.
        "RTS": {"canvas": 42, "rotation_deg": 45.0, "scale_min": 0.7, "scale_max": 1.2},  # [S]
        "P": {"canvas": 28, "scale_min": 0.75, "scale_max": 1.0},  # [?] canvas and scale.
        "E": {"canvas": 28, "scale_min": 0.75, "scale_max": 1.0},  # [?] canvas and scale.
        "TC": {"canvas": 60},  # [P] 60x60, translation only.
    }.items()
}


def _check_digits(digits: ArrayLike) -> jax.Array:
    digits = jnp.asarray(digits)
    if digits.ndim != 4:
        raise ValueError(f"digits must have shape (B, H, W, C), got {digits.shape}")
    if not jnp.issubdtype(digits.dtype, jnp.floating):
        raise ValueError(f"digits must be a float array in [0, 1], got dtype {digits.dtype}")
    return digits


def _check_canvas(canvas) -> int:
    if not isinstance(canvas, int) or canvas < 1:
        raise ValueError(f"canvas must be a positive int, got {canvas!r}")
    return canvas


def _check_range(name: str, low: float, high: float) -> None:
    if not low <= high:
        raise ValueError(f"{name}: expected min <= max, got ({low}, {high})")


def _theta_from_pixel_map(
    matrix: jax.Array, offset: jax.Array, *, canvas: int, digit_hw: tuple[int, int]
) -> jax.Array:
    """Affine-grid theta for the pull map ``d = matrix @ c + offset`` in centred pixels.

    Args:
      matrix: (B, 2, 2) linear part, canvas pixels -> digit pixels.
      offset: (B, 2) digit point (centred pixels) read at the canvas centre.
      canvas: side of the square output.
      digit_hw: (H, W) of the digit.

    Returns:
      (B, 2, 3) theta in normalised coordinates (align_corners=False).
    """
    h, w = digit_hw
    to_digit = jnp.array([2.0 / w, 2.0 / h], matrix.dtype)  # centred digit px -> normalised
    linear = to_digit[None, :, None] * matrix * (canvas / 2.0)
    shift = to_digit[None, :] * offset
    return jnp.concatenate([linear, shift[:, :, None]], axis=2)


def _rotation_inverse(angle_rad: jax.Array, scale: jax.Array) -> jax.Array:
    """(B, 2, 2) pull matrix of "scale, then rotate CCW as displayed (y down)".

    The forward map is d -> s [[cos, sin], [-sin, cos]] d in (x, y-down) coordinates; its
    inverse is [[cos, -sin], [sin, cos]] / s.
    """
    cos, sin = jnp.cos(angle_rad), jnp.sin(angle_rad)
    rows = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)
    return rows / scale[:, None, None]


def _uniform(key, batch, low, high):
    return jax.random.uniform(key, (batch,), jnp.float32, low, high)


def _sample_affine(digits, matrix, offset, canvas):
    theta = _theta_from_pixel_map(matrix, offset, canvas=canvas, digit_hw=digits.shape[1:3])
    grid = stn_jax.affine_grid(theta, (canvas, canvas))
    return stn_jax.bilinear_sample(digits, grid, padding_mode="zeros")


@functools.partial(jax.jit, static_argnames=("canvas",))
def affine_warp(
    digits: ArrayLike,
    *,
    angle_deg: ArrayLike,
    scale: ArrayLike,
    translation_px: ArrayLike,
    canvas: int,
) -> jax.Array:
    """Scales, rotates and moves each digit onto a black canvas: the deterministic part of R/RTS.

    The digit is scaled by `scale` and rotated by `angle_deg` about its centre (positive =
    counter-clockwise as displayed), and its centre goes to the canvas centre plus
    `translation_px` (x, y down).

    Args:
      digits: (B, H, W, C) float.
      angle_deg: (B,) degrees.
      scale: (B,).
      translation_px: (B, 2) canvas pixels.
      canvas: side of the square output.

    Returns:
      (B, canvas, canvas, C).

    Example:
      >>> digit = jnp.arange(28.0 * 28).reshape(1, 28, 28, 1) / 784
      >>> ones = jnp.ones((1,))
      >>> out = affine_warp(digit, angle_deg=90 * ones, scale=ones,
      ...                   translation_px=jnp.zeros((1, 2)), canvas=28)
      >>> bool(jnp.allclose(out[0, :, :, 0], jnp.rot90(digit[0, :, :, 0]), atol=1e-5))
      True
    """
    digits = _check_digits(digits)
    _check_canvas(canvas)
    batch = digits.shape[0]
    angle_deg = jnp.broadcast_to(jnp.asarray(angle_deg, jnp.float32), (batch,))
    scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (batch,))
    translation = jnp.broadcast_to(jnp.asarray(translation_px, jnp.float32), (batch, 2))
    matrix = _rotation_inverse(jnp.deg2rad(angle_deg), scale)
    offset = -jnp.einsum("bij,bj->bi", matrix, translation)
    return _sample_affine(digits, matrix, offset, canvas)


@functools.partial(jax.jit, static_argnames=("canvas", "rotation_deg", "scale_min", "scale_max"))
def rotate(
    key: jax.Array,
    digits: ArrayLike,
    *,
    canvas: int = PAPER_SETTINGS["R"]["canvas"],
    rotation_deg: float = PAPER_SETTINGS["R"]["rotation_deg"],
    scale_min: float = PAPER_SETTINGS["R"]["scale_min"],
    scale_max: float = PAPER_SETTINGS["R"]["scale_max"],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """R: rotate each digit about its centre by U[-rotation_deg, rotation_deg] degrees.

    Args:
      key: PRNG key.
      digits: (B, H, W, C) float in [0, 1].
      canvas: side of the square output; the digit stays centred.
      rotation_deg: half-range of the angle; positive = counter-clockwise as displayed.
      scale_min, scale_max: range of an isotropic scale applied before the rotation.

    Returns:
      images (B, canvas, canvas, C); params {"angle_deg": (B,), "scale": (B,)}.

    Example:
      >>> images, params = rotate(jax.random.key(0), jnp.zeros((4, 28, 28, 1)))
      >>> bool(jnp.all(jnp.abs(params["angle_deg"]) <= 90))
      True
    """
    digits = _check_digits(digits)
    _check_canvas(canvas)
    _check_range("scale_min, scale_max", scale_min, scale_max)
    batch = digits.shape[0]
    k_angle, k_scale = jax.random.split(key)
    angle_deg = _uniform(k_angle, batch, -rotation_deg, rotation_deg)
    scale = _uniform(k_scale, batch, scale_min, scale_max)
    images = affine_warp(
        digits,
        angle_deg=angle_deg,
        scale=scale,
        translation_px=jnp.zeros((batch, 2), jnp.float32),
        canvas=canvas,
    )
    return images, {"angle_deg": angle_deg, "scale": scale}


@functools.partial(jax.jit, static_argnames=("canvas", "rotation_deg", "scale_min", "scale_max"))
def rotate_translate_scale(
    key: jax.Array,
    digits: ArrayLike,
    *,
    canvas: int = PAPER_SETTINGS["RTS"]["canvas"],
    rotation_deg: float = PAPER_SETTINGS["RTS"]["rotation_deg"],
    scale_min: float = PAPER_SETTINGS["RTS"]["scale_min"],
    scale_max: float = PAPER_SETTINGS["RTS"]["scale_max"],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RTS: rotate, scale and place each digit at a random position on a larger canvas.

    The digit is scaled by s ~ U[scale_min, scale_max] and rotated by U[-rotation_deg,
    rotation_deg] degrees about its centre, which then moves to canvas centre + t,
    t ~ U[-m, m] px per axis with m = max(canvas - s * W, 0) / 2: the scaled digit frame stays
    on the canvas (MNIST ink lies in the central 20x20, so rotated ink stays on it too).

    Args:
      key: PRNG key.
      digits: (B, H, W, C) float in [0, 1].
      canvas: side of the square output (42 in the paper [S]).
      rotation_deg: half-range of the angle in degrees [S].
      scale_min, scale_max: range of the scale [S].

    Returns:
      images (B, canvas, canvas, C); params {"angle_deg": (B,), "scale": (B,),
      "translation_px": (B, 2) (x, y) of the digit centre from the canvas centre, y down}.

    Example:
      >>> images, params = rotate_translate_scale(jax.random.key(0), jnp.zeros((4, 28, 28, 1)))
      >>> images.shape, params["translation_px"].shape
      ((4, 42, 42, 1), (4, 2))
    """
    digits = _check_digits(digits)
    _check_canvas(canvas)
    _check_range("scale_min, scale_max", scale_min, scale_max)
    batch, h, w = digits.shape[:3]
    k_angle, k_scale, k_shift = jax.random.split(key, 3)
    angle_deg = _uniform(k_angle, batch, -rotation_deg, rotation_deg)
    scale = _uniform(k_scale, batch, scale_min, scale_max)
    frame = jnp.stack([scale * w, scale * h], axis=-1)
    margin = jnp.maximum(canvas - frame, 0.0) / 2.0
    translation = margin * jax.random.uniform(k_shift, (batch, 2), jnp.float32, -1.0, 1.0)
    images = affine_warp(
        digits, angle_deg=angle_deg, scale=scale, translation_px=translation, canvas=canvas
    )
    return images, {"angle_deg": angle_deg, "scale": scale, "translation_px": translation}


@jax.jit
def homography_from_points(src: ArrayLike, dst: ArrayLike) -> jax.Array:
    """The plane homographies mapping 4 points src[b, i] to dst[b, i], by an 8x8 solve.

    Solves for h (with H[2, 2] = 1) the standard linear system: for each pair (x, y) -> (u, v),
    ``[x, y, 1, 0, 0, 0, -u x, -u y] . h = u`` and ``[0, 0, 0, x, y, 1, -v x, -v y] . h = v``.

    Args:
      src: (B, 4, 2) points (x, y), no three collinear.
      dst: (B, 4, 2) their images.

    Returns:
      (B, 8): the first 8 row-major entries of H, the format of ``stn_jax.projective_grid``.

    Example:
      >>> square = jnp.array([[[-1., -1.], [1., -1.], [1., 1.], [-1., 1.]]])
      >>> (homography_from_points(square, 2 * square).round(5) + 0.0).tolist()  # + 0: no -0.0
      [[2.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0]]
    """
    src = jnp.asarray(src, jnp.float32)
    dst = jnp.asarray(dst, jnp.float32)
    if src.ndim != 3 or src.shape[1:] != (4, 2) or dst.shape != src.shape:
        raise ValueError(
            f"src and dst must both have shape (B, 4, 2), got {src.shape} and {dst.shape}"
        )
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    one, zero = jnp.ones_like(x), jnp.zeros_like(x)
    rows_u = jnp.stack([x, y, one, zero, zero, zero, -u * x, -u * y], axis=-1)
    rows_v = jnp.stack([zero, zero, zero, x, y, one, -v * x, -v * y], axis=-1)
    system = jnp.concatenate([rows_u, rows_v], axis=1)  # (B, 8, 8)
    rhs = jnp.concatenate([u, v], axis=1)  # (B, 8)
    return jnp.linalg.solve(system, rhs[..., None])[..., 0]


# Frame corners in normalised (x, y): top-left, top-right, bottom-right, bottom-left.
_FRAME_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


@functools.partial(
    jax.jit, static_argnames=("canvas", "scale_min", "scale_max", "corner_std_px")
)
def projective(
    key: jax.Array,
    digits: ArrayLike,
    *,
    canvas: int = PAPER_SETTINGS["P"]["canvas"],
    scale_min: float = PAPER_SETTINGS["P"]["scale_min"],
    scale_max: float = PAPER_SETTINGS["P"]["scale_max"],
    corner_std_px: float = PAPER_SETTINGS["P"]["corner_std_px"],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """P: scale about the centre, jitter the 4 frame corners, warp by the homography.

    The digit's frame corners (+-W/2, +-H/2) px go to s * corner + N(0, corner_std_px^2) per
    axis (canvas pixels, centred); the image is warped by the homography through these 4 pairs.
    With the defaults about 1.4% of the moved quadrilaterals are not convex (measured over
    1e6 draws); their homography sends part of the canvas through infinity, which reads as
    black. They are kept, not redrawn: the paper does not say, and the sampler is safe for
    any homography.

    Args:
      key: PRNG key.
      digits: (B, H, W, C) float in [0, 1].
      canvas: side of the square output [?].
      scale_min, scale_max: range of the scale [?].
      corner_std_px: standard deviation of each corner's displacement, canvas pixels [?].

    Returns:
      images (B, canvas, canvas, C); params {"scale": (B,), "corners_px": (B, 4, 2) where the
      frame corners (top-left, top-right, bottom-right, bottom-left) land, centred canvas
      pixels (x, y down); "homography": (B, 8) canvas normalised -> digit normalised}.

    Example:
      >>> images, params = projective(jax.random.key(0), jnp.zeros((4, 28, 28, 1)))
      >>> images.shape, params["homography"].shape
      ((4, 28, 28, 1), (4, 8))
    """
    digits = _check_digits(digits)
    _check_canvas(canvas)
    _check_range("scale_min, scale_max", scale_min, scale_max)
    batch, h, w = digits.shape[:3]
    k_scale, k_corner = jax.random.split(key)
    scale = _uniform(k_scale, batch, scale_min, scale_max)
    half = jnp.array([w / 2.0, h / 2.0], jnp.float32)
    frame = jnp.array(_FRAME_CORNERS, jnp.float32)  # digit normalised
    noise = corner_std_px * jax.random.normal(k_corner, (batch, 4, 2), jnp.float32)
    corners_px = scale[:, None, None] * frame * half + noise
    corners_canvas = corners_px / (canvas / 2.0)
    # Pull map: canvas (output) points -> digit (input) points.
    homography = homography_from_points(corners_canvas, jnp.broadcast_to(frame, (batch, 4, 2)))
    grid = stn_jax.projective_grid(homography, (canvas, canvas))
    images = stn_jax.bilinear_sample(digits, grid, padding_mode="zeros")
    return images, {"scale": scale, "corners_px": corners_px, "homography": homography}


@functools.partial(
    jax.jit,
    static_argnames=("canvas", "scale_min", "scale_max", "control_std_px", "control_grid_size"),
)
def elastic(
    key: jax.Array,
    digits: ArrayLike,
    *,
    canvas: int = PAPER_SETTINGS["E"]["canvas"],
    scale_min: float = PAPER_SETTINGS["E"]["scale_min"],
    scale_max: float = PAPER_SETTINGS["E"]["scale_max"],
    control_std_px: float = PAPER_SETTINGS["E"]["control_std_px"],
    control_grid_size: int = PAPER_SETTINGS["E"]["control_grid_size"],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """E: scale, jitter a regular lattice of control points, warp by a thin plate spline.

    The control points form a control_grid_size^2 lattice over the digit frame
    (``stn_jax.default_control_points``, corners at the frame corners). Each goes to
    s * point + N(0, control_std_px^2) per axis (canvas pixels, centred); the warp is the thin
    plate spline through these pairs (``stn_jax.tps_grid`` with the moved points as the output
    control points and the lattice as where they read the digit).

    Args:
      key: PRNG key.
      digits: (B, H, W, C) float in [0, 1].
      canvas: side of the square output [?].
      scale_min, scale_max: range of the scale [?].
      control_std_px: standard deviation of each control point's displacement [S].
      control_grid_size: lattice side; 4 gives the paper's 16 points [P].

    Returns:
      images (B, canvas, canvas, C); params {"scale": (B,), "control_points_px": (B, K, 2)
      where the lattice points land, centred canvas pixels (x, y down)}.

    Example:
      >>> images, params = elastic(jax.random.key(0), jnp.zeros((4, 28, 28, 1)))
      >>> images.shape
      (4, 28, 28, 1)
    """
    digits = _check_digits(digits)
    _check_canvas(canvas)
    _check_range("scale_min, scale_max", scale_min, scale_max)
    batch, h, w = digits.shape[:3]
    k_scale, k_points = jax.random.split(key)
    scale = _uniform(k_scale, batch, scale_min, scale_max)
    lattice = stn_jax.default_control_points(control_grid_size)  # digit normalised
    half = jnp.array([w / 2.0, h / 2.0], jnp.float32)
    noise = control_std_px * jax.random.normal(k_points, (batch,) + lattice.shape, jnp.float32)
    points_px = scale[:, None, None] * lattice * half + noise
    points_canvas = points_px / (canvas / 2.0)

    def one_grid(out_points):
        return stn_jax.tps_grid(lattice[None], (canvas, canvas), control_points=out_points)[0]

    grid = jax.vmap(one_grid)(points_canvas)
    images = stn_jax.bilinear_sample(digits, grid, padding_mode="zeros")
    return images, {"scale": scale, "control_points_px": points_px}


def _integer_offsets(key, shape, high):
    """Uniform ints in [0, high] (inclusive), float32 for the grid maths."""
    return jax.random.randint(key, shape, 0, high + 1).astype(jnp.float32)


def _paste(pieces: jax.Array, offsets: jax.Array, *, canvas: int, mode: str) -> jax.Array:
    """Pastes pieces (B, N, h, w, C) with integer top-left (x, y) offsets (B, N, 2) on black.

    One scatter of B * N * h * w updates; overlapping pieces combine by "add" or "max";
    pixels falling off the canvas are dropped.
    """
    batch, num, h, w, _ = pieces.shape
    ys, xs = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    offsets = offsets.astype(jnp.int32)
    cols = xs[None, None] + offsets[:, :, None, None, 0]
    rows = ys[None, None] + offsets[:, :, None, None, 1]
    index = jnp.broadcast_to(jnp.arange(batch)[:, None, None, None], rows.shape)
    target = jnp.zeros((batch, canvas, canvas, pieces.shape[-1]), pieces.dtype)
    at = target.at[index, rows, cols]
    return at.add(pieces, mode="drop") if mode == "add" else at.max(pieces, mode="drop")


@functools.partial(
    jax.jit,
    static_argnames=("canvas", "clutter_size", "scale_min", "scale_max", "combine"),
)
def cluttered(
    key: jax.Array,
    digits: ArrayLike,
    clutter_sources: ArrayLike,
    *,
    canvas: int = PAPER_SETTINGS["TC"]["canvas"],
    clutter_size: int = PAPER_SETTINGS["TC"]["clutter_size"],
    scale_min: float = PAPER_SETTINGS["TC"]["scale_min"],
    scale_max: float = PAPER_SETTINGS["TC"]["scale_max"],
    combine: str = PAPER_SETTINGS["TC"]["clutter_combine"],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """TC: the digit at a random place on a black canvas, plus random crops of other digits.

    The digit's frame (scaled by s ~ U[scale_min, scale_max], default 1) goes to a uniform
    integer top-left position in [0, canvas - s * W]; each of the N = clutter_sources.shape[1]
    clutter pieces is the clutter_size^2 window of its source digit at a uniform integer
    offset, pasted at a uniform integer position in [0, canvas - clutter_size]. With s = 1
    every layer is an exact pixel copy.

    Args:
      key: PRNG key.
      digits: (B, H, W, C) float in [0, 1].
      clutter_sources: (B, N, H, W, C): the digits to crop the clutter of sample b from
        (the caller picks other digits than digits[b]; the paper uses N = 6 [S]).
      canvas: side of the square output (60 [P]).
      clutter_size: side of a square crop (6 [?]).
      scale_min, scale_max: range of the digit's scale (1: none).
      combine: "add" (sum then clip to [0, 1], as DeepMind's mnist-cluttered) or "max".

    Returns:
      images (B, canvas, canvas, C); params {"digit_offset_px": (B, 2) top-left (x, y) of the
      digit frame, "clutter_offset_px": (B, N, 2) top-left of each crop on the canvas,
      "crop_offset_px": (B, N, 2) top-left of each crop in its source digit, "scale": (B,)}.

    Example:
      >>> digits, others = jnp.zeros((4, 28, 28, 1)), jnp.ones((4, 6, 28, 28, 1))
      >>> images, params = cluttered(jax.random.key(0), digits, others)  # 6 crops each
      >>> images.shape, params["crop_offset_px"].shape
      ((4, 60, 60, 1), (4, 6, 2))
    """
    digits = _check_digits(digits)
    _check_canvas(canvas)
    _check_range("scale_min, scale_max", scale_min, scale_max)
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    clutter_sources = jnp.asarray(clutter_sources, digits.dtype)
    batch, h, w, channels = digits.shape
    if clutter_sources.ndim != 5 or clutter_sources.shape[0] != batch or (
        clutter_sources.shape[2:] != digits.shape[1:]
    ):
        raise ValueError(
            f"clutter_sources must have shape ({batch}, N, {h}, {w}, {channels}), got "
            f"{clutter_sources.shape}"
        )
    if not 1 <= clutter_size <= min(h, w, canvas):
        raise ValueError(f"clutter_size must be in [1, {min(h, w, canvas)}], got {clutter_size}")
    num = clutter_sources.shape[1]
    k_scale, k_pos, k_crop, k_place = jax.random.split(key, 4)

    scale = _uniform(k_scale, batch, scale_min, scale_max)
    frame = jnp.stack([scale * w, scale * h], axis=-1)
    room = jnp.floor(jnp.maximum(canvas - frame, 0.0))
    digit_offset = jnp.floor(jax.random.uniform(k_pos, (batch, 2)) * (room + 1.0))
    if scale_min == scale_max == 1.0 and canvas >= max(h, w):
        # Unscaled: an exact pixel copy, far cheaper than sampling the whole canvas.
        digit_layer = _paste(digits[:, None], digit_offset[:, None], canvas=canvas, mode="add")
    else:
        # Pull map, scale s about the frame's top-left corner o:
        # digit (centred) = (c + canvas/2 - o) / s - (w/2, h/2).
        matrix = jnp.eye(2, dtype=jnp.float32)[None] / scale[:, None, None]
        offset = (canvas / 2.0 - digit_offset) / scale[:, None] - jnp.array([w / 2.0, h / 2.0])
        digit_layer = _sample_affine(digits, matrix, offset, canvas)

    # The clutter: crop each window with an integer translation grid (exact pixel copies),
    # then paste it at its integer position.
    crop = _integer_offsets(k_crop, (batch, num, 2), jnp.array([w, h]) - clutter_size)
    place = _integer_offsets(k_place, (batch, num, 2), canvas - clutter_size)
    pix = jnp.arange(clutter_size, dtype=jnp.float32)
    window_xy = jnp.stack(jnp.meshgrid(pix, pix), axis=-1)  # (size, size, 2) pixel (x, y)
    src_xy = window_xy[None, None] + crop[:, :, None, None, :]
    grid = (2.0 * src_xy + 1.0) / jnp.array([w, h], jnp.float32) - 1.0  # pixel centres
    pieces = stn_jax.bilinear_sample(
        clutter_sources.reshape((batch * num, h, w, channels)),
        grid.reshape((batch * num, clutter_size, clutter_size, 2)),
        padding_mode="zeros",
    ).reshape((batch, num, clutter_size, clutter_size, channels))
    clutter = _paste(pieces, place, canvas=canvas, mode=combine)
    if combine == "add":
        images = jnp.clip(digit_layer + clutter, 0.0, 1.0)
    else:
        images = jnp.maximum(digit_layer, clutter)
    params = {
        "digit_offset_px": digit_offset,
        "clutter_offset_px": place,
        "crop_offset_px": crop,
        "scale": scale,
    }
    return images, params


def distortion_fn(distortion: str):
    """The generator of a distortion name ("R", "RTS", "P", "E" or "TC")."""
    table = {
        "R": rotate,
        "RTS": rotate_translate_scale,
        "P": projective,
        "E": elastic,
        "TC": cluttered,
    }
    if distortion not in table:
        raise ValueError(f"distortion must be one of {DISTORTIONS}, got {distortion!r}")
    return table[distortion]

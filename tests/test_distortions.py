"""Tests for stn_jax.data.distortions: geometry, statistics and determinism of R/RTS/P/E/TC."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stn_jax.data import distortions as D
from stn_jax.data import mnist

B = 16  # one batch shape for most tests, so each generator compiles once


@pytest.fixture(scope="module")
def digits():
    images, _ = mnist.read_bundled()
    return jnp.asarray(images[::250][:B, :, :, None], jnp.float32) / 255.0


@pytest.fixture(scope="module")
def clutter_sources(digits):
    # Other digits: sample b gets the 6 digits after it (cyclically).
    idx = (np.arange(B)[:, None] + np.arange(1, 7)[None]) % B
    return digits[idx]


def _pixel_xy(size):
    """Centred pixel coordinates (x, y down) of a size x size image."""
    c = np.arange(size) + 0.5 - size / 2
    return np.meshgrid(c, c)


def _bar_image(batch):
    """A horizontal bar 3 x 21 px with a blob on its right end: orientation and sign are visible."""
    img = np.zeros((28, 28), np.float32)
    img[13:16, 4:25] = 1.0
    return jnp.broadcast_to(jnp.asarray(img)[None, :, :, None], (batch, 28, 28, 1))


def _gaussian_image(batch, sigma=2.5):
    x, y = _pixel_xy(28)
    img = np.exp(-(x**2 + y**2) / (2 * sigma**2)).astype(np.float32)
    return jnp.broadcast_to(jnp.asarray(img)[None, :, :, None], (batch, 28, 28, 1))


def _moments(images):
    """Mass, centroid (x, y centred px) and per-axis variance of each image (B, S, S, 1)."""
    images = np.asarray(images)[..., 0].astype(np.float64)
    x, y = _pixel_xy(images.shape[1])
    mass = images.sum(axis=(1, 2))
    cx = (images * x).sum(axis=(1, 2)) / mass
    cy = (images * y).sum(axis=(1, 2)) / mass
    var_x = (images * (x - cx[:, None, None]) ** 2).sum(axis=(1, 2)) / mass
    var_y = (images * (y - cy[:, None, None]) ** 2).sum(axis=(1, 2)) / mass
    cov = (images * (x - cx[:, None, None]) * (y - cy[:, None, None])).sum(axis=(1, 2)) / mass
    return mass, cx, cy, var_x, var_y, cov


# ----------------------------------------------------------------------------- R


def test_rotate_by_90_is_rot90_counter_clockwise(digits):
    one = jnp.ones((B,))
    zero = jnp.zeros((B, 2))
    x = np.asarray(digits[..., 0])
    for angle, k in [(90.0, 1), (-90.0, -1), (180.0, 2), (0.0, 0)]:
        out = D.affine_warp(
            digits, angle_deg=angle * one, scale=one, translation_px=zero, canvas=28
        )
        np.testing.assert_allclose(out[..., 0], np.rot90(x, k=k, axes=(1, 2)), atol=1e-5)
    # Hand-checked: a single pixel in the top-right corner goes to the top-left corner.
    dot = np.zeros((1, 28, 28, 1), np.float32)
    dot[0, 0, 27, 0] = 1.0
    out = D.affine_warp(dot, angle_deg=jnp.array([90.0]), scale=jnp.ones(1),
                        translation_px=jnp.zeros((1, 2)), canvas=28)
    assert abs(float(out[0, 0, 0, 0]) - 1.0) < 1e-5 and abs(float(out.sum()) - 1.0) < 1e-4


def test_rotate_angles_match_the_image_and_cover_the_range():
    bar = _bar_image(256)
    images, params = D.rotate(jax.random.key(3), bar)
    angles = np.asarray(params["angle_deg"])
    assert images.shape == (256, 28, 28, 1)
    assert angles.min() >= -90.0 and angles.max() <= 90.0
    assert angles.min() < -80.0 and angles.max() > 80.0 and abs(angles.mean()) < 10.0
    np.testing.assert_array_equal(params["scale"], np.ones(256))
    # The bar's principal axis recovers the angle: direction (cos a, -sin a) with y down.
    _, _, _, var_x, var_y, cov = _moments(images)
    axis_deg = np.degrees(0.5 * np.arctan2(2 * cov, var_x - var_y))  # in (-90, 90]
    recovered = -axis_deg
    diff = (recovered - angles + 90.0) % 180.0 - 90.0  # a bar's axis is defined mod 180
    assert np.abs(diff).max() < 1.0, np.abs(diff).max()
    # Ink is preserved by a rotation about the centre (the bar stays inside the canvas).
    np.testing.assert_allclose(np.asarray(images).sum(axis=(1, 2, 3)), 63.0, rtol=0.01)


def test_rotate_sign_positive_is_counter_clockwise():
    # A bar with a blob at its right end; +45 deg must move the blob up (y decreases).
    img = np.zeros((1, 28, 28, 1), np.float32)
    img[0, 13:15, 14:24, 0] = 1.0
    out = D.affine_warp(img, angle_deg=jnp.array([45.0]), scale=jnp.ones(1),
                        translation_px=jnp.zeros((1, 2)), canvas=28)
    _, cx, cy, _, _, _ = _moments(out)
    assert cx[0] > 2.0 and cy[0] < -2.0


# ----------------------------------------------------------------------------- determinism


def _run(name, key, digits, clutter_sources):
    fn = D.distortion_fn(name)
    return fn(key, digits, clutter_sources) if name == "TC" else fn(key, digits)


@pytest.mark.parametrize(
    "name, canvas", [("R", 28), ("RTS", 42), ("P", 28), ("E", 28), ("TC", 60)]
)
def test_deterministic_for_a_key_different_for_another(name, canvas, digits, clutter_sources):
    a, params_a = _run(name, jax.random.key(0), digits, clutter_sources)
    b, params_b = _run(name, jax.random.key(0), digits, clutter_sources)
    c, _ = _run(name, jax.random.key(1), digits, clutter_sources)
    assert a.shape == (B, canvas, canvas, 1) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    for k in params_a:
        np.testing.assert_array_equal(params_a[k], params_b[k])
    assert float(jnp.abs(a - c).mean()) > 1e-3
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 + 1e-6
    ink = np.asarray(a).sum(axis=(1, 2, 3))
    # Every sample keeps some ink (P squeezes a few digits hard: about 6% keep < 25%).
    assert np.median(ink) > 20.0 and np.all(ink > 1.0)


def test_distortion_fn_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"one of \('R', 'RTS', 'P', 'E', 'TC'\).*'Z'"):
        D.distortion_fn("Z")


# ----------------------------------------------------------------------------- RTS


def test_rts_scale_translation_and_angle_are_in_the_image():
    n = 64
    blob = _gaussian_image(n)
    images, params = D.rotate_translate_scale(jax.random.key(7), blob)
    scale = np.asarray(params["scale"])
    t = np.asarray(params["translation_px"])
    angle = np.asarray(params["angle_deg"])
    assert images.shape == (n, 42, 42, 1)
    assert scale.min() >= 0.7 and scale.max() <= 1.2 and np.ptp(scale) > 0.3
    assert np.abs(angle).max() <= 45.0 and np.ptp(angle) > 45.0
    margin = (42 - 28 * scale) / 2
    assert np.all(np.abs(t) <= margin[:, None] + 1e-5)
    mass_in, _, _, var_in, _, _ = _moments(blob[:1])
    mass, cx, cy, var_x, var_y, _ = _moments(images)
    # Centroid = canvas centre + translation; mass and variance scale with s^2.
    np.testing.assert_allclose(cx, t[:, 0], atol=0.05)
    np.testing.assert_allclose(cy, t[:, 1], atol=0.05)
    np.testing.assert_allclose(mass / mass_in, scale**2, rtol=0.01)
    np.testing.assert_allclose(np.sqrt((var_x + var_y) / 2 / var_in), scale, rtol=0.02)
    # The angle: same bar check as R, after RTS.
    bar_images, bar_params = D.rotate_translate_scale(jax.random.key(7), _bar_image(n))
    _, _, _, vx, vy, cov = _moments(bar_images)
    recovered = -np.degrees(0.5 * np.arctan2(2 * cov, vx - vy))
    np.testing.assert_allclose(recovered, bar_params["angle_deg"], atol=1.0)


def test_rts_real_digits_stay_on_the_canvas(digits):
    images, params = D.rotate_translate_scale(jax.random.key(11), digits)
    scale = np.asarray(params["scale"])
    kept = np.asarray(images).sum(axis=(1, 2, 3)) / np.asarray(digits).sum(axis=(1, 2, 3))
    # Bilinear resampling keeps ink mass * s^2 to a few %; clipped ink would lose more.
    np.testing.assert_allclose(kept / scale**2, 1.0, atol=0.04)
    # Ink bounding box: within the canvas, size between 0.7x and 1.2*sqrt(2)x of the digit's.
    ink = np.asarray(images)[..., 0] > 0.1
    for b in range(B):
        rows, cols = np.flatnonzero(ink[b].any(1)), np.flatnonzero(ink[b].any(0))
        src = np.asarray(digits)[b, ..., 0] > 0.1
        src_extent = max(np.ptp(np.flatnonzero(src.any(1))), np.ptp(np.flatnonzero(src.any(0))))
        extent = max(np.ptp(rows), np.ptp(cols))
        assert 0.7 * src_extent - 2 <= extent <= 1.2 * np.sqrt(2) * src_extent + 2


# ----------------------------------------------------------------------------- P


def test_homography_from_points_maps_the_points():
    rng = np.random.default_rng(0)
    src = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32)[None] * [[[0.8]], [[1.0]]]
    dst = src + rng.normal(0, 0.15, src.shape).astype(np.float32)
    h = np.asarray(D.homography_from_points(src, dst))
    m = np.concatenate([h, np.ones((2, 1))], axis=1).reshape(2, 3, 3)
    uvw = np.einsum("bij,bkj->bki", m, np.concatenate([src, np.ones((2, 4, 1))], axis=-1))
    np.testing.assert_allclose(uvw[..., :2] / uvw[..., 2:], dst, atol=1e-5)
    scale2 = D.homography_from_points(src[:1], 2 * src[:1])
    np.testing.assert_allclose(scale2, [[2, 0, 0, 0, 2, 0, 0, 0]], atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 4, 2\)"):
        D.homography_from_points(src[:, :3], dst[:, :3])


def _shoelace(poly):
    x, y = poly[..., 0], poly[..., 1]
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, -1) - np.roll(x, -1, -1) * y, axis=-1))


def test_projective_warps_the_frame_onto_the_moved_corners():
    n = 64
    full = jnp.ones((n, 28, 28, 1))
    # A canvas larger than the digit, so that no corner falls off it.
    images, params = D.projective(jax.random.key(5), full, canvas=40, scale_min=0.75,
                                  scale_max=0.75, corner_std_px=2.0)
    corners = np.asarray(params["corners_px"])
    assert np.abs(corners).max() < 20
    frame = np.array([(-14, -14), (14, -14), (14, 14), (-14, 14)], np.float32)
    # The warped frame fills the quadrilateral of the moved corners: area by the shoelace formula.
    area = np.asarray(images).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(area, _shoelace(corners), rtol=0.03)
    # Corner noise statistics with the defaults (over 64 x 4 x 2 draws): N(0, 5 px).
    _, params = D.projective(jax.random.key(6), full)
    scale = np.asarray(params["scale"])
    noise = np.asarray(params["corners_px"]) - scale[:, None, None] * frame
    assert scale.min() >= 0.75 and scale.max() <= 1.0
    assert abs(noise.std() - 5.0) < 0.6 and abs(noise.mean()) < 0.8


# ----------------------------------------------------------------------------- E


def test_elastic_without_noise_is_the_pure_scale(digits):
    kw = dict(control_std_px=0.0)
    same, _ = D.elastic(jax.random.key(0), digits, scale_min=1.0, scale_max=1.0, **kw)
    np.testing.assert_allclose(same, digits, atol=1e-4)
    half, params = D.elastic(jax.random.key(0), digits, scale_min=0.6, scale_max=0.6, **kw)
    ref = D.affine_warp(digits, angle_deg=jnp.zeros(B), scale=0.6 * jnp.ones(B),
                        translation_px=jnp.zeros((B, 2)), canvas=28)
    np.testing.assert_allclose(half, ref, atol=1e-4)
    np.testing.assert_allclose(params["control_points_px"][0, 0], [-0.6 * 14, -0.6 * 14], atol=1e-5)
    # On a larger canvas too (the lattice is converted to canvas-normalised coordinates).
    big, _ = D.elastic(jax.random.key(0), digits, canvas=40, scale_min=1.2, scale_max=1.2, **kw)
    ref = D.affine_warp(digits, angle_deg=jnp.zeros(B), scale=1.2 * jnp.ones(B),
                        translation_px=jnp.zeros((B, 2)), canvas=40)
    np.testing.assert_allclose(big, ref, atol=1e-4)


def test_elastic_control_point_statistics(digits):
    images, params = D.elastic(jax.random.key(9), digits)
    scale = np.asarray(params["scale"])
    lattice = np.asarray(D.stn_jax.default_control_points(4)) * 14.0
    noise = np.asarray(params["control_points_px"]) - scale[:, None, None] * lattice
    assert params["control_points_px"].shape == (B, 16, 2)
    assert scale.min() >= 0.75 and scale.max() <= 1.0
    assert abs(noise.std() - 1.5) < 0.15 and abs(noise.mean()) < 0.2  # 512 draws
    # A small warp: the image stays close to the scaled digit, but is not equal to it.
    ref = D.affine_warp(
        digits, angle_deg=jnp.zeros(B), scale=scale, translation_px=jnp.zeros((B, 2)), canvas=28
    )
    diff = np.abs(np.asarray(images) - np.asarray(ref)).mean()
    assert 0.005 < diff < 0.1, diff


# ----------------------------------------------------------------------------- TC


def _tc_reference(digits, sources, params, canvas, size, combine):
    digits, sources = np.asarray(digits), np.asarray(sources)
    out = np.zeros((digits.shape[0], canvas, canvas, 1), np.float32)
    digit_layer = np.zeros_like(out)
    for b in range(digits.shape[0]):
        ox, oy = np.asarray(params["digit_offset_px"][b]).astype(int)
        digit_layer[b, oy:oy + 28, ox:ox + 28] = digits[b]
        for k in range(sources.shape[1]):
            px, py = np.asarray(params["clutter_offset_px"][b, k]).astype(int)
            cx, cy = np.asarray(params["crop_offset_px"][b, k]).astype(int)
            piece = sources[b, k, cy:cy + size, cx:cx + size]
            window = out[b, py:py + size, px:px + size]
            out[b, py:py + size, px:px + size] = (
                window + piece if combine == "add" else np.maximum(window, piece)
            )
    if combine == "add":
        return np.clip(digit_layer + out, 0, 1)
    return np.maximum(digit_layer, out)


@pytest.mark.parametrize("combine", ["add", "max"])
def test_cluttered_matches_a_numpy_reference(digits, clutter_sources, combine):
    images, params = D.cluttered(jax.random.key(4), digits, clutter_sources, combine=combine)
    ref = _tc_reference(digits, clutter_sources, params, 60, 6, combine)
    np.testing.assert_allclose(images, ref, atol=1e-5)
    assert params["clutter_offset_px"].shape == (B, 6, 2)
    for name, high in [("digit_offset_px", 32), ("clutter_offset_px", 54), ("crop_offset_px", 22)]:
        p = np.asarray(params[name])
        assert p.min() >= 0 and p.max() <= high and np.array_equal(p, np.round(p))


def test_cluttered_counts_digit_and_clutter_pieces():
    # Digit: a 28x28 block of 0.25; clutter: all-ones sources. With "max" every pixel of value 1
    # belongs to one of the 6 squares; the 0.25 pixels are the digit frame not covered by them.
    n = 32
    digit = jnp.full((n, 28, 28, 1), 0.25)
    sources = jnp.ones((n, 6, 28, 28, 1))
    images, params = D.cluttered(jax.random.key(2), digit, sources, combine="max")
    images = np.asarray(images)[..., 0]
    for b in range(n):
        squares = np.zeros((60, 60), bool)
        for px, py in np.asarray(params["clutter_offset_px"][b]).astype(int):
            squares[py:py + 6, px:px + 6] = True
        frame = np.zeros((60, 60), bool)
        ox, oy = np.asarray(params["digit_offset_px"][b]).astype(int)
        frame[oy:oy + 28, ox:ox + 28] = True
        np.testing.assert_array_equal(images[b] == 1.0, squares)
        np.testing.assert_array_equal(np.isclose(images[b], 0.25), frame & ~squares)
        assert 36 < squares.sum() <= 6 * 36
    # Digit positions cover the canvas uniformly (33 x 33 integer positions).
    offsets = np.asarray(params["digit_offset_px"])
    assert offsets.min() <= 3 and offsets.max() >= 29


def test_cluttered_scaled_digit_and_argument_checks(digits, clutter_sources):
    images, params = D.cluttered(jax.random.key(1), digits, clutter_sources, scale_min=0.5,
                                 scale_max=0.5, clutter_size=1, combine="max")
    # Half-size digit: ink mass / 4 (up to resampling), plus at most 6 single clutter pixels.
    mass = np.asarray(images).sum(axis=(1, 2, 3))
    expected = np.asarray(digits).sum(axis=(1, 2, 3)) / 4
    np.testing.assert_allclose(mass, expected, atol=6.5, rtol=0.05)
    assert np.asarray(params["digit_offset_px"]).max() <= 46
    with pytest.raises(ValueError, match=r"clutter_sources must have shape \(16, N, 28, 28, 1\)"):
        D.cluttered(jax.random.key(1), digits, clutter_sources[:, 0])
    with pytest.raises(ValueError, match="combine must be one of"):
        D.cluttered(jax.random.key(1), digits, clutter_sources, combine="sum")
    with pytest.raises(ValueError, match=r"digits must have shape \(B, H, W, C\)"):
        D.rotate(jax.random.key(1), digits[..., 0])

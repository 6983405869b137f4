"""Pictures of what the spatial transformer does, as in Fig. 1 / Table 1 (right) of the paper.

For each test digit a tile shows the input with the outline of the transformer's sampling grid
(and a few of its lines) drawn on it, the transformer's output beside it, and the predicted and
true labels under them (green when right, red when wrong). The input sits in a grey margin so
that a grid reaching past the image's edge stays visible. Non-transformer models get the input
and the labels only. PIL only; small digits are upscaled so the picture reads at a glance.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from flax import nnx
import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (40, 40, 40)
_MARGIN = (75, 75, 75)
_OUTLINE = (255, 60, 60)
# One outline colour per transformer of a model (the first is _OUTLINE).
OUTLINE_COLOURS = (_OUTLINE, (60, 160, 255), (80, 230, 80), (255, 170, 0), (220, 80, 255),
                   (0, 220, 220))
_GRID_LINES = (255, 200, 0)
_RIGHT = (90, 220, 90)
_WRONG = (255, 90, 90)
_PAD = 6
_TEXT_HEIGHT = 18


def make_picture_fn(graphdef: nnx.GraphDef, rest: Any):
    """Jitted `(params, images) -> {"logits", and for ST models "output", "grid"}`.

    `output` (B,H',W',C) is the transformer's output and `grid` (B,H',W',2) its sampling grid in
    normalised input coordinates, from `model.spatial_transform`.
    """

    def picture_fn(params, images):
        model = nnx.merge(graphdef, params, rest)
        out = {"logits": model(images)}
        if model.has_transformer:
            out["output"], _, out["grid"] = model.spatial_transform(images)
        return out

    return jax.jit(picture_fn)


def display_scale(side: int) -> int:
    """Integer upscaling that makes a `side`-pixel image about 112-170 pixels on screen."""
    return max(2, math.ceil(112 / side))


def _to_rgb(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """(H,W,C) float image in [0,1] -> RGB PIL image of `size` (w, h), nearest upscaling."""
    pixels = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    elif pixels.shape[-1] != 3:
        pixels = np.repeat(pixels.mean(-1, keepdims=True), 3, axis=-1)
    picture = Image.fromarray((pixels * 255.0 + 0.5).astype(np.uint8), "RGB")
    return picture.resize(size, Image.NEAREST)


def grid_outline(grid: np.ndarray) -> np.ndarray:
    """The boundary of the region a sampling grid reads, as a closed polygon.

    The grid holds the input points read at output pixel *centres*; the region the output
    covers reaches half a pixel further, so the edge rows and columns are extrapolated by half
    a step (exact for affine grids, close for smooth ones).

    Args:
        grid: (H',W',2) normalised (x, y) input points, H', W' >= 2.

    Returns:
        (2*(H'+W'+2), 2) points (the edge pixel centres and the four extrapolated corners),
        clockwise from the top-left corner, in normalised coordinates.

    Example:
        >>> grid = stn_jax.regular_grid((4, 4))  # identity: covers exactly [-1, 1]^2
        >>> grid_outline(np.asarray(grid))[0]
        array([-1., -1.])
    """
    g = np.asarray(grid, np.float64)
    if g.ndim != 3 or g.shape[-1] != 2 or min(g.shape[:2]) < 2:
        raise ValueError(f"grid must be (H',W',2) with H',W' >= 2, got {g.shape}")
    g = np.concatenate([1.5 * g[:1] - 0.5 * g[1:2], g, 1.5 * g[-1:] - 0.5 * g[-2:-1]], axis=0)
    g = np.concatenate(
        [1.5 * g[:, :1] - 0.5 * g[:, 1:2], g, 1.5 * g[:, -1:] - 0.5 * g[:, -2:-1]], axis=1
    )
    top, right = g[0, :-1], g[:-1, -1]
    bottom, left = g[-1, ::-1][:-1], g[::-1, 0][:-1]
    return np.concatenate([top, right, bottom, left], axis=0)


def _to_display(points: np.ndarray, in_hw: tuple[int, int], scale: int, offset: int) -> list:
    """Normalised (x, y) (align_corners=False) -> pixel positions in the upscaled panel whose
    image starts at (offset, offset)."""
    h, w = in_hw
    x = offset + (points[..., 0] + 1.0) * 0.5 * w * scale
    y = offset + (points[..., 1] + 1.0) * 0.5 * h * scale
    # A wild transformer (huge or non-finite grid) must not break the picture of it.
    x, y = (np.clip(np.nan_to_num(v), -1e4, 1e4) for v in (x, y))
    return list(zip(x.tolist(), y.tolist()))


def _draw_grid(draw: ImageDraw.ImageDraw, grid: np.ndarray, in_hw, scale, offset, *, lines=3,
               colour=_OUTLINE):
    """Draws `lines` interior grid rows and columns, then the grid's outline, onto the input."""
    rows, cols = grid.shape[:2]
    for i in np.linspace(0, rows - 1, lines + 2)[1:-1].round().astype(int):
        draw.line(_to_display(grid[i], in_hw, scale, offset), fill=_GRID_LINES, width=1)
    for j in np.linspace(0, cols - 1, lines + 2)[1:-1].round().astype(int):
        draw.line(_to_display(grid[:, j], in_hw, scale, offset), fill=_GRID_LINES, width=1)
    outline = _to_display(grid_outline(grid), in_hw, scale, offset)
    draw.line(outline + outline[:1], fill=colour, width=2)


def render(
    images: np.ndarray,
    *,
    labels: np.ndarray,
    predictions: np.ndarray,
    outputs: np.ndarray | None = None,
    grids: np.ndarray | None = None,
    views: list[dict] | None = None,
    columns: int | None = None,
    title: str = "",
    label_text: Callable[[np.ndarray], str] | None = None,
) -> np.ndarray:
    """Draws one tile per image into a single RGB picture.

    Args:
        images: (N,H,W,C) inputs in [0,1] (clipped), C = 1 or 3.
        labels: (N,) true labels, or (N, L) label sequences (with `label_text`).
        predictions: like `labels`; a tile is right (green) when its prediction equals its
            label in every position.
        outputs: (N,H',W',C) transformer outputs, or None for a model without one.
        grids: (N,H',W',2) the transformer's sampling grids (normalised input (x, y),
            align_corners=False); given together with `outputs`.
        views: instead of outputs and grids, one dict per transformer of the model
            (`model.transformer_views`): "output" (N,H',W',C) and "grid" (N,H',W',2), and
            optionally "input_view" (N,H',W',C'), the input read at the grid, which the
            panel shows instead of the output (for a transformer deep in the network, whose
            output is a feature map). Every grid is drawn on the input in its own colour
            (`OUTLINE_COLOURS`), every view in its own panel.
        columns: tiles per row (default 4 with a transformer, 8 without).
        title: a line of text over the tiles (e.g. the step and test error).
        label_text: one label or prediction (a row of `labels`) -> its text; default the
            integer, e.g. `lambda row: "".join(str(d) for d in row if d < 10)` for numbers.

    Returns:
        (height, width, 3) uint8 picture.

    Example:
        >>> picture = render(x, labels=y, predictions=logits.argmax(-1), outputs=out, grids=grid)
        >>> Image.fromarray(picture).save("step_001000.png")
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N,H,W,C), got {images.shape}")
    n, h, w = images.shape[:3]
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if len(labels) != n or predictions.shape != labels.shape:
        raise ValueError(f"labels and predictions must be ({n}, ...) alike, got {labels.shape} "
                         f"and {predictions.shape}")
    label_text = label_text or (lambda label: str(int(label)))
    if (outputs is None) != (grids is None):
        raise ValueError("outputs and grids go together: give both or neither")
    if views is not None and outputs is not None:
        raise ValueError("give views, or outputs and grids, not both")
    if outputs is not None:
        views = [{"output": outputs, "grid": grids}]
    views = list(views or [])
    for view in views:
        if np.shape(view["grid"])[0] != n or np.shape(view["grid"])[-1] != 2:
            raise ValueError(f"grids must be ({n},H',W',2), got {np.shape(view['grid'])}")
    grids = views[0]["grid"] if views else None
    outputs = views[0]["output"] if views else None

    scale = display_scale(max(h, w))
    cell_w, cell_h = w * scale, h * scale
    margin = 0 if grids is None else max(cell_w, cell_h) // 5
    panels = 1 + len(views)
    columns = min(columns or (8 if outputs is None else 4), n)
    rows = math.ceil(n / columns)
    tile_w = cell_w + 2 * margin + (panels - 1) * (cell_w + _PAD)
    tile_h = cell_h + 2 * margin + _TEXT_HEIGHT
    title_h = _TEXT_HEIGHT + _PAD if title else 0
    width = columns * tile_w + (columns + 1) * 2 * _PAD
    height = title_h + rows * tile_h + (rows + 1) * 2 * _PAD
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if title:
        draw.text((2 * _PAD, _PAD), title, fill=(230, 230, 230), font=font)

    for k in range(n):
        row, col = divmod(k, columns)
        x0 = 2 * _PAD + col * (tile_w + 2 * _PAD)
        y0 = title_h + 2 * _PAD + row * (tile_h + 2 * _PAD)
        panel = Image.new("RGB", (cell_w + 2 * margin, cell_h + 2 * margin), _MARGIN)
        panel.paste(_to_rgb(images[k], (cell_w, cell_h)), (margin, margin))
        for v, view in enumerate(views):
            colour = OUTLINE_COLOURS[v % len(OUTLINE_COLOURS)]
            # Interior grid lines for a single transformer; with several, outlines only.
            _draw_grid(ImageDraw.Draw(panel), np.asarray(view["grid"][k]), (h, w), scale,
                       margin, colour=colour, lines=3 if len(views) == 1 else 0)
            out = np.asarray(view.get("input_view", view["output"])[k])
            size = (cell_w, cell_h)
            left = x0 + cell_w + 2 * margin + _PAD + v * (cell_w + _PAD)
            canvas.paste(_to_rgb(out, size), (left, y0 + margin))
            if len(views) > 1:
                ImageDraw.Draw(canvas).rectangle(
                    [left, y0 + margin, left + size[0] - 1, y0 + margin + size[1] - 1],
                    outline=colour, width=2)
        canvas.paste(panel, (x0, y0))
        right = bool(np.array_equal(predictions[k], labels[k]))
        draw.text((x0, y0 + cell_h + 2 * margin + 2),
                  f"pred {label_text(predictions[k])}  true {label_text(labels[k])}",
                  fill=_RIGHT if right else _WRONG, font=font)
    return np.asarray(canvas)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=14)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font.
        return ImageFont.load_default()


def save_png(picture: np.ndarray, path: str) -> None:
    """Writes an (H,W,3) uint8 picture to `path`, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(picture).save(path)

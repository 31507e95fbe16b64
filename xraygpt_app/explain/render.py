"""Pictures of a :class:`~xraygpt_app.explain.maps.Heatmap`: an overlay on the displayed image, and a PNG figure.

Colour scale (matplotlib's perceptually uniform ``inferno``): black/purple = 0 (the score does not
rise there), yellow = 1 (the cell that most raises it). Pixels the model never saw (cropped away by
its preprocessing) are hatched grey.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ..errors import BadInputError
from .maps import Heatmap

COLORMAP = "inferno"
SCALE_TEXT = ("Colour: dark purple = 0 (the score does not rise there) to yellow = 1 (most sensitive region); "
              "hatched grey = not seen by the model (cropped away by its preprocessing).")
DISCLAIMER = "Research and education only - not a diagnosis"


def colorize(image_map: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours of a [0, 1] map; NaN (not seen) becomes a grey hatch."""
    values = np.nan_to_num(image_map, nan=0.0)
    rgb = (colormaps[COLORMAP](values)[..., :3] * 255).astype(np.uint8)
    unseen = np.isnan(image_map)
    if unseen.any():
        rows, cols = np.indices(image_map.shape)
        stripe = ((rows + cols) // 6) % 2 == 0
        rgb[unseen] = np.where(stripe[unseen, None], 150, 90).astype(np.uint8)
    return rgb


def overlay(image: Image.Image, heatmap: Heatmap, opacity: float = 0.5) -> Image.Image:
    """The displayed image with the map blended on top (``opacity`` 0 = image only, 1 = map only).

    Cropped-away borders are always shown hatched, whatever the opacity.
    """
    if image.size != (heatmap.geometry.width, heatmap.geometry.height):
        raise BadInputError(f"the map is for a {heatmap.geometry.width}x{heatmap.geometry.height} image,"
                         f" not {image.width}x{image.height}")
    opacity = float(np.clip(opacity, 0.0, 1.0))
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    image_map = heatmap.full_map()
    colours = colorize(image_map).astype(np.float32)
    alpha = np.full(image_map.shape, opacity, dtype=np.float32)
    alpha[np.isnan(image_map)] = 1.0
    blended = base * (1 - alpha[..., None]) + colours * alpha[..., None]
    return Image.fromarray(blended.round().astype(np.uint8), "RGB")


def figure_png(image: Image.Image, heatmap: Heatmap, title: str = "", path: str | Path | None = None,
               opacity: float = 0.5) -> bytes:
    """A PNG with the overlay on the displayed image and the raw map on the model's grid, a colour bar and
    the plain-words meaning; written to ``path`` when given."""
    fig = Figure(figsize=(10, 5.6))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.imshow(overlay(image, heatmap, opacity))
    left.set_title(f"overlay on the displayed image ({image.width}x{image.height})", fontsize=9)
    shown = right.imshow(heatmap.grid, cmap=COLORMAP, vmin=0, vmax=1, interpolation="nearest")
    h, w = heatmap.grid.shape
    right.set_title(f"raw map on the model's {h}x{w} grid", fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(shown, ax=[left, right], fraction=0.025, pad=0.02)
    bar.set_label(heatmap.scale, fontsize=8)
    fig.suptitle(f"{title or heatmap.label}\n{heatmap.model}: {heatmap.method}; explained score"
                 f" {heatmap.target:.3f}", fontsize=10)
    footer = f"{heatmap.meaning[0].upper()}{heatmap.meaning[1:]}. Hatched grey: not seen by the model. {DISCLAIMER}."
    fig.text(0.5, 0.02, textwrap.fill(footer, 150), ha="center", fontsize=8)  # a long meaning must not be cut off
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data

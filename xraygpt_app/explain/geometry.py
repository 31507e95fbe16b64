"""Where each model input pixel comes from in the displayed image, per model's exact preprocessing.

Every preprocessing we support is axis-aligned: pad the image onto a canvas, resize the canvas,
crop a window. :class:`InputGeometry` records those three steps, and :func:`to_image` carries a
map on the model's input square (at any grid resolution) back onto the 8-bit image the user saw,
with NaN where the model saw nothing (cropped-away borders).

- XrayGPT (BLIP-2 eval transform): resize to S x S, aspect ratio not kept.
- MedCLIP: paste centred on a black square canvas of side max(224, W, H), then resize to 224.
- BiomedCLIP (open_clip): resize the shortest side to 224, then crop the centre 224 x 224.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision import transforms

from ..errors import BadInputError

# Preprocessing steps that change values, never positions (torchvision's and open_clip's names).
PIXEL_ONLY_STEPS = ("ToTensor", "MaybeToTensor", "PILToTensor", "Normalize", "MaybeConvertMode", "_convert_to_rgb",
                    "ConvertImageDtype")


@dataclass(frozen=True)
class InputGeometry:
    """Image (width x height) -> pad to canvas -> resize canvas -> crop a ``size`` x ``size`` window."""

    width: int
    height: int
    size: int  # side of the square model input
    pad_x: int = 0  # left/top offset of the image on the canvas
    pad_y: int = 0
    canvas_w: int = 0  # canvas size (0: the image itself)
    canvas_h: int = 0
    resized_w: int = 0  # canvas after resizing (0: size)
    resized_h: int = 0
    crop_x: int = 0  # left/top of the crop window in the resized canvas
    crop_y: int = 0

    def input_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """For each image column and row centre, its continuous coordinate (0..size) on the model input."""
        canvas_w, canvas_h = self.canvas_w or self.width, self.canvas_h or self.height
        resized_w, resized_h = self.resized_w or self.size, self.resized_h or self.size
        u = (np.arange(self.width) + 0.5 + self.pad_x) * resized_w / canvas_w - self.crop_x
        v = (np.arange(self.height) + 0.5 + self.pad_y) * resized_h / canvas_h - self.crop_y
        return u, v

    def seen_mask(self) -> np.ndarray:
        """(H, W) bool: which pixels of the displayed image fall inside the model input."""
        u, v = self.input_coords()
        return ((v >= 0) & (v < self.size))[:, None] & ((u >= 0) & (u < self.size))[None, :]


def xraygpt_geometry(width: int, height: int, size: int) -> InputGeometry:
    """BLIP-2's eval transform: a bicubic squeeze of the whole image to size x size."""
    return InputGeometry(width, height, size)


def medclip_geometry(width: int, height: int, size: int = 224) -> InputGeometry:
    """MedCLIP: centred on a square canvas of side max(size, W, H), then resized to size (see medclip_preprocess)."""
    side = max(size, width, height)
    return InputGeometry(width, height, size, pad_x=(side - width) // 2, pad_y=(side - height) // 2,
                         canvas_w=side, canvas_h=side)


def torchvision_geometry(width: int, height: int, transform: transforms.Compose) -> InputGeometry:
    """The geometry of a torchvision eval transform made of Resize and CenterCrop (open_clip's preprocess).

    Follows torchvision's own size arithmetic: Resize(int) scales the shorter side (the longer one is
    truncated to int), Resize((h, w)) squeezes; CenterCrop rounds its offsets.
    """
    resized_w, resized_h, crop = width, height, None
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, transforms.Resize):
            resized_w, resized_h = _resized(resized_w, resized_h, step.size, step.max_size)
        elif isinstance(step, transforms.CenterCrop):
            crop = step.size
        elif getattr(step, "__name__", type(step).__name__) not in PIXEL_ONLY_STEPS:
            raise BadInputError(f"cannot map a heatmap back through the preprocessing step {step!r}")
    crop_h, crop_w = crop if crop is not None else (resized_h, resized_w)
    if crop_h != crop_w:
        raise BadInputError(f"the model input is not square ({crop_w}x{crop_h})")
    return InputGeometry(width, height, crop_w, resized_w=resized_w, resized_h=resized_h,
                         crop_x=int(round((resized_w - crop_w) / 2.0)), crop_y=int(round((resized_h - crop_h) / 2.0)))


def _resized(width: int, height: int, size, max_size) -> tuple[int, int]:
    if isinstance(size, int) or len(size) == 1:
        requested = size if isinstance(size, int) else size[0]
        short, long = min(width, height), max(width, height)
        new_short, new_long = requested, int(requested * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        return (new_short, new_long) if width <= height else (new_long, new_short)
    return int(size[1]), int(size[0])


def to_image(grid: np.ndarray, geometry: InputGeometry) -> np.ndarray:
    """(H, W) float32: ``grid`` (covering the model input square) sampled at every displayed pixel.

    Bilinear between grid-cell centres; NaN where the pixel was cropped away (not seen by the model).
    """
    u, v = geometry.input_coords()
    nx = torch.from_numpy(2 * u / geometry.size - 1).float()
    ny = torch.from_numpy(2 * v / geometry.size - 1).float()
    coords = torch.stack(torch.meshgrid(nx, ny, indexing="xy"), dim=-1).unsqueeze(0)  # (1, H, W, 2) as (x, y)
    source = torch.as_tensor(np.asarray(grid, dtype=np.float32))[None, None]
    sampled = torch.nn.functional.grid_sample(source, coords, mode="bilinear", padding_mode="border",
                                              align_corners=False)[0, 0].numpy()
    sampled[~geometry.seen_mask()] = np.nan
    return sampled

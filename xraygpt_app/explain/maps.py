"""What every explanation returns (:class:`Heatmap`) and the small tools the map makers share."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .geometry import InputGeometry, to_image

MEANING = "where the model's score is most sensitive; not a segmentation, not a diagnosis"
SCALE = "relative sensitivity (0 = none, 1 = most)"


@dataclass
class Heatmap:
    """One map: on the model's grid and on the displayed image.

    ``grid`` is scaled to [0, 1] (1 = the cell that most raises the explained score; 0 = no increase);
    ``raw_grid`` keeps the method's own units. ``image_map`` is ``grid`` carried back through the
    model's exact preprocessing onto the image the user saw: NaN where the model did not see the image.
    """

    label: str  # the zero-shot label, or the explained words of an answer
    grid: np.ndarray  # (h, w) float32 in [0, 1]
    raw_grid: np.ndarray  # (h, w) float32, the method's units
    image_map: np.ndarray  # (H, W) float32 in [0, 1], NaN = not seen by the model
    method: str
    model: str
    target: float  # the explained score: the label's ensemble logit, or the words' summed log-probability
    geometry: InputGeometry
    meaning: str = MEANING  # what the map shows, in plain words (attention maps say so)
    scale: str = SCALE  # what 0 and 1 of ``grid`` mean

    def slim(self) -> Heatmap:
        """A copy without the full-size ``image_map`` (recomputed from the grid when needed): small to keep."""
        return dataclasses.replace(self, image_map=np.empty((0, 0), dtype=np.float32))

    def full_map(self) -> np.ndarray:
        """``image_map``, recomputed from the grid and the geometry if this is a slim copy."""
        return self.image_map if self.image_map.size else to_image(self.grid, self.geometry)

    def to_dict(self, image_map: bool = False) -> dict:
        """A JSON-ready dict: the grid as nested lists (the full-size map only when asked: it is large)."""
        data = {"label": self.label, "method": self.method, "model": self.model, "target": self.target,
                "grid": self.grid.round(4).tolist(), "raw_grid": self.raw_grid.tolist(),
                "image_size": [self.geometry.width, self.geometry.height], "meaning": self.meaning}
        if image_map:
            full = self.full_map()
            data["image_map"] = np.where(np.isnan(full), None, full.round(4)).tolist()
        return data


def make_heatmap(label: str, raw_grid: np.ndarray, geometry: InputGeometry, method: str, model: str,
                 target: float) -> Heatmap:
    """Scale the positive part of ``raw_grid`` to [0, 1] and map it onto the displayed image."""
    raw = np.asarray(raw_grid, dtype=np.float32)
    positive = np.maximum(raw, 0)
    peak = float(positive.max())
    grid = positive / peak if peak > 0 else np.zeros_like(positive)
    return Heatmap(label, grid, raw, to_image(grid, geometry), method, model, float(target), geometry)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters need no gradient while a map is computed (only activations do); restored afterwards.

    Keeps a map from costing parameter gradients, and from leaving ``.grad`` tensors or a changed
    ``requires_grad`` behind: the normal scoring and generation paths see the model unchanged.
    """
    params = list(module.parameters())
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def delete_cells(pixels: torch.Tensor, cells: np.ndarray, fill: float = 0.0) -> torch.Tensor:
    """A copy of normalised ``pixels`` (N, C, S, S) with the True cells of a (h, w) grid set to ``fill``.

    0 in normalised units is the dataset's mean intensity: "deleting" a region removes its content.
    """
    size = pixels.shape[-1]
    mask = torch.from_numpy(np.asarray(cells, dtype=np.float32))[None, None]
    mask = torch.nn.functional.interpolate(mask, size=(size, size), mode="nearest")[0, 0].bool()
    out = pixels.clone()
    out[..., mask] = fill
    return out


def top_cells(grid: np.ndarray, fraction: float) -> np.ndarray:
    """Bool mask of the ``fraction`` highest cells of ``grid`` (at least one)."""
    count = max(1, int(round(fraction * grid.size)))
    order = np.argsort(-grid.ravel(), kind="stable")[:count]
    mask = np.zeros(grid.size, dtype=bool)
    mask[order] = True
    return mask.reshape(grid.shape)


def random_cells(shape: tuple[int, int], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Bool mask of a random ``fraction`` of the cells (the same count as :func:`top_cells`)."""
    size = shape[0] * shape[1]
    count = max(1, int(round(fraction * size)))
    mask = np.zeros(size, dtype=bool)
    mask[rng.choice(size, count, replace=False)] = True
    return mask.reshape(shape)

"""MedKLIP's maps: its own grounding (decoder cross-attention), with Grad-CAM and occlusion to compare.

The grounding map is what MedKLIP's RSNA grounding test computes: each decoder layer's
cross-attention of an entity's query over the 14 x 14 image tokens (heads averaged), averaged over
the last four layers. MedKLIP squeezes the image to 224 x 224 without keeping its aspect ratio, so the
map is stretched back over the whole displayed image (the geometry is read from its transform).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from ..errors import BadInputError
from ..zeroshot.medklip import PREPROCESS
from ..zeroshot.medklip_classifier import GROUNDING_METHOD, MedKLIPClassifier, PromptSet
from .geometry import InputGeometry, torchvision_geometry
from .maps import Heatmap, make_heatmap
from .zeroshot_maps import method_grids, prepared

log = logging.getLogger(__name__)
METHODS = ("attention", "grad-cam", "occlusion")
ATTENTION_MEANING = ("where the finding's query attends in the image (MedKLIP's grounding); attention, not a "
                     "segmentation, not a diagnosis")
ATTENTION_SCALE = "relative attention (0 = none, 1 = the most attended cell)"


class LogOdds(nn.Module):
    """Preprocessed pixels -> (N, C) log-odds of the prompt set's labels (what Grad-CAM and occlusion explain)."""

    def __init__(self, classifier: MedKLIPClassifier, prompt_set: PromptSet) -> None:
        super().__init__()
        self.classifier = classifier
        self.model = classifier.model  # registered, so Grad-CAM finds the parameters
        self.plan = classifier.query_plan(prompt_set)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        slots, entities, extra = self.plan
        logits = self.classifier.decode_labels(self.model.image_tokens(pixels), slots, entities.to(pixels.device),
                                         extra.to(pixels.device)).logits
        return logits[..., 1] - logits[..., 0]


def medklip_geometry(image: Image.Image) -> InputGeometry:
    """MedKLIP's input square: the whole image squeezed to 224 x 224 (from its own transform)."""
    return torchvision_geometry(image.width, image.height, PREPROCESS)


def medklip_heatmaps(classifier: MedKLIPClassifier, image: Image.Image, *, labels: Sequence[str] | None = None,
                     preset: str | None = None, prompts: PromptSet | None = None, only: Sequence[str] | None = None,
                     method: str | None = None, occlusion_grid: int = 7) -> list[Heatmap]:
    """One map per label (or per label in ``only``); ``method`` None or ``attention`` = MedKLIP's grounding."""
    method = method or "attention"
    if method not in METHODS:
        raise BadInputError(f"unknown map method {method!r} for MedKLIP (known: {', '.join(METHODS)})")
    started = time.perf_counter()
    prompt_set, indices, image = prepared(classifier, image, labels, preset, prompts, only)
    names, geometry = list(prompt_set), medklip_geometry(image)
    if method == "attention":
        out = classifier.outputs([image], prompt_set)
        grids = out.grounding()[0].numpy()[indices]
        targets = out.probabilities()[0].numpy()[indices]
        h, w = grids.shape[1:]
        maps = [dataclasses.replace(make_heatmap(names[i], grids[k], geometry, f"{GROUNDING_METHOD}, {h}x{w}",
                                                 classifier.name, targets[k]),
                                    meaning=ATTENTION_MEANING, scale=ATTENTION_SCALE)
                for k, i in enumerate(indices)]
    else:
        maps = _gradient_maps(classifier, image, prompt_set, indices, method, occlusion_grid, geometry)
    log.info("%d MedKLIP %s maps in %.2f s", len(maps), method, time.perf_counter() - started)
    return maps


def _gradient_maps(classifier: MedKLIPClassifier, image: Image.Image, prompt_set: PromptSet, indices: list[int],
                   method: str, occlusion_grid: int, geometry: InputGeometry) -> list[Heatmap]:
    """Grad-CAM on the last ResNet stage MedKLIP keeps (layer3, 14 x 14), or occlusion, of each label's log-odds."""
    scorer = LogOdds(classifier, prompt_set)
    pixels = classifier.pixel_values([image]).to(classifier.device)
    layer = classifier.model.res_features[-1]  # layer3, the last stage MedKLIP keeps (14 x 14)
    grids, targets, description = method_grids(scorer, pixels, indices, method, occlusion_grid, layer)
    description += " (MedKLIP ResNet layer3) of the log-odds" if method == "grad-cam" else " of the log-odds"
    names = list(prompt_set)
    return [make_heatmap(names[i], grids[k], geometry, description, classifier.name, targets[k])
            for k, i in enumerate(indices)]

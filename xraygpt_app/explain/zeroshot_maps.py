"""Zero-shot maps: Grad-CAM (pytorch-grad-cam) of each label's ensemble logit, plus occlusion for comparison.

The explained score is exactly the one :class:`~xraygpt_app.zeroshot.classifier.ZeroShotClassifier` reports:
``ensemble_logits`` over the classifier's cached prompt embeddings, on the encoder's own
preprocessing (``pixel_values`` / ``embed_pixels``). Grad-CAM layers:

- MedCLIP ResNet-50: ``layer4`` (stage 4, 7 x 7);
- MedCLIP Swin: the final layer norm after the last stage (7 x 7 tokens);
- BiomedCLIP ViT: ``norm1`` of the last block, the patch tokens as a 14 x 14 grid (CLS dropped).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from ..errors import BadInputError
from ..imaging.loader import model_ready
from ..zeroshot.classifier import ZeroShotClassifier, ensemble_logits
from ..zeroshot.prompts import PromptSet
from .geometry import InputGeometry, medclip_geometry, torchvision_geometry
from .maps import Heatmap, delete_cells, frozen, make_heatmap

log = logging.getLogger(__name__)
METHODS = ("grad-cam", "occlusion")


class LabelLogits(nn.Module):
    """Preprocessed pixels -> (N, C) ensemble logits, differentiable; the classifier's own scoring."""

    def __init__(self, classifier: ZeroShotClassifier, prompt_set: PromptSet) -> None:
        super().__init__()
        self.encoder = classifier.encoder
        self.tower = self.encoder.model  # registered, so Grad-CAM finds the parameters and their device
        self.class_embeds = classifier.text_embeddings(prompt_set)  # the classifier's cache
        self.ensemble = classifier.ensemble

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        embeds = self.encoder.embed_pixels(pixels)
        class_embeds = [e.to(embeds.device) for e in self.class_embeds]
        return ensemble_logits(embeds, class_embeds, self.encoder.logit_scale(), self.ensemble)


def _tokens_to_grid(prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(N, prefix + h*w, C) tokens -> (N, C, h, w), the layout Grad-CAM averages gradients over."""
    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:]
        side = math.isqrt(patches.shape[1])
        return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)
    return reshape


def target_layer(encoder) -> tuple[nn.Module, Callable | None, str]:
    """The Grad-CAM layer of an encoder's vision tower, its reshape to a grid, and a short description."""
    model = encoder.model
    vision = getattr(model, "vision_model", None)
    if vision is not None and getattr(vision, "variant", None) == "resnet":
        return vision.model.layer4, None, "MedCLIP ResNet-50 stage 4"
    if vision is not None and getattr(vision, "variant", None) == "vit":
        return vision.model.layernorm, _tokens_to_grid(0), "MedCLIP Swin last stage"
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):
        return trunk.blocks[-1].norm1, _tokens_to_grid(trunk.num_prefix_tokens), "BiomedCLIP ViT patch tokens"
    raise BadInputError(f"no heatmap support for the vision tower {type(model).__name__}")


def geometry_of(encoder, image: Image.Image) -> InputGeometry:
    """How this encoder's preprocessing places ``image`` on its input square."""
    width, height = image.size
    if hasattr(encoder, "preprocess"):  # open_clip's transform (BiomedCLIP)
        return torchvision_geometry(width, height, encoder.preprocess)
    return medclip_geometry(width, height)


class _GridGradCAM(GradCAM):
    """Grad-CAM kept at the layer's own grid (we resample once, through the exact preprocessing)."""

    def get_target_width_height(self, input_tensor: torch.Tensor) -> None:
        return None


def _label_indices(prompt_set: PromptSet, only: Sequence[str] | None) -> list[int]:
    names = list(prompt_set)
    if only is None:
        return list(range(len(names)))
    missing = [label for label in only if label not in names]
    if missing:
        raise BadInputError(f"no such label in this result: {', '.join(missing)} (labels: {', '.join(names)})")
    return [names.index(label) for label in only]


def method_grids(scorer: nn.Module, pixels: torch.Tensor, indices: list[int], method: str, occlusion_grid: int,
                 layer: nn.Module, reshape: Callable | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Grad-CAM (on ``layer``) or occlusion grids of the scorer's logits, the explained logits, the method's name."""
    if method == "grad-cam":
        grids, targets = grad_cam_grids(scorer, pixels, indices, layer, reshape)
        return grids, targets, "Grad-CAM"
    grids = occlusion_grids(scorer, pixels, indices, occlusion_grid)
    with torch.no_grad():
        base = scorer(pixels)[0]
    targets = np.array([float(base[i]) for i in indices])
    return grids, targets, f"occlusion ({occlusion_grid}x{occlusion_grid} cells set to the mean intensity)"


def prepared(classifier, image: Image.Image, labels: Sequence[str] | None, preset: str | None,
             prompts: PromptSet | None, only: Sequence[str] | None) -> tuple[PromptSet, list[int], Image.Image]:
    """The classifier's prompt set for the request, the indices of the labels to map, the model-ready image."""
    prompt_set = classifier.prompt_set(labels, preset, prompts)
    return prompt_set, _label_indices(prompt_set, only), model_ready(image)


def grad_cam_grids(scorer: nn.Module, pixels: torch.Tensor, indices: list[int], layer: nn.Module | None = None,
                   reshape: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(len(indices), h, w) Grad-CAM grids (ReLU'd, pytorch-grad-cam's scaling) and the explained logits.

    ``layer``/``reshape``: the layer to explain (default: the CLIP encoder's, see ``target_layer``).
    """
    if layer is None:
        layer, reshape, _ = target_layer(scorer.encoder)
    batch = pixels.expand(len(indices), *pixels.shape[1:]).clone()
    with frozen(scorer), _GridGradCAM(model=scorer, target_layers=[layer], reshape_transform=reshape) as cam:
        cam.compute_input_gradient = True  # parameters are frozen: the graph starts at the input
        grids = cam(input_tensor=batch, targets=[ClassifierOutputTarget(i) for i in indices])
        logits = cam.outputs.detach()
    targets = np.array([float(logits[row, i]) for row, i in enumerate(indices)])
    return np.asarray(grids, dtype=np.float32), targets


@torch.no_grad()
def occlusion_grids(scorer: LabelLogits, pixels: torch.Tensor, indices: list[int], grid: int) -> np.ndarray:
    """(len(indices), grid, grid): drop of each label's logit when one cell is set to the mean intensity."""
    base = scorer(pixels)[0]
    drops = np.zeros((len(indices), grid, grid), dtype=np.float32)
    for row in range(grid):
        batch = []
        for col in range(grid):
            cells = np.zeros((grid, grid), dtype=bool)
            cells[row, col] = True
            batch.append(delete_cells(pixels, cells))
        logits = scorer(torch.cat(batch))  # one forward per grid row
        for k, i in enumerate(indices):
            drops[k, row] = (base[i] - logits[:, i]).cpu().numpy()
    return drops


def encoder_heatmaps(classifier: ZeroShotClassifier, image: Image.Image, *, labels: Sequence[str] | None = None,
                     preset: str | None = None, prompts: PromptSet | None = None, only: Sequence[str] | None = None,
                     method: str | None = None, occlusion_grid: int = 7) -> list[Heatmap]:
    """Grad-CAM (or occlusion) maps of an image-text encoder's label logits (MedCLIP, BiomedCLIP), one per label.

    Computed only when called; the classifier's scores and caches are left as they were.
    """
    method = method or "grad-cam"
    if method not in METHODS:
        raise BadInputError(f"unknown map method {method!r} for {classifier.name} (known: {', '.join(METHODS)})")
    started = time.perf_counter()
    prompt_set, indices, image = prepared(classifier, image, labels, preset, prompts, only)
    scorer = LabelLogits(classifier, prompt_set)
    pixels = classifier.encoder.pixel_values([image])
    layer, reshape, layer_name = target_layer(classifier.encoder)
    grids, targets, description = method_grids(scorer, pixels, indices, method, occlusion_grid, layer, reshape)
    if method == "grad-cam":
        description = f"{description} ({layer_name})"
    geometry = geometry_of(classifier.encoder, image)
    names = list(prompt_set)
    maps = [make_heatmap(names[i], grids[k], geometry, description, classifier.name, targets[k])
            for k, i in enumerate(indices)]
    log.info("%d %s maps in %.2f s", len(maps), method, time.perf_counter() - started)
    return maps

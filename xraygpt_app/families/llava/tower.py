"""The llava family's vision tower: any open_clip image tower, read for its real patch tokens.

The model comes from open_clip's own loader (``biomedclip.load_open_clip``: a local folder with
``open_clip_config.json``, or a ``hf-hub:`` snapshot of one such as BiomedCLIP) with its own
preprocessing (BiomedCLIP: shortest side to 224, centre crop, its mean/std). The tokens are an
intermediate output of the tower's transformer through open_clip's ``forward_intermediates``, which
for a timm trunk (BiomedCLIP's ViT-B/16) is the trunk's own ``forward_intermediates``: LLaVA-1.5's
choice by default, the penultimate block with the class token dropped (196 tokens at 224 px).
The pooled, projected CLIP embedding is never used. The tower is frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ...config import Config, TowerConfig
from ...errors import ConfigError, MissingWeightsError
from ...imaging.loader import model_ready
from ...weights import resolve_weights
from ...zeroshot.biomedclip import load_open_clip, text_tower_repos

log = logging.getLogger(__name__)


class PatchTokenTower(nn.Module):
    """An open_clip image tower returning one block's per-token outputs, shape ``(1, tokens, width)``."""

    def __init__(self, visual: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor], config: TowerConfig):
        super().__init__()
        self.visual, self.preprocess_fn = visual, preprocess
        self.layer, self.keep_cls = config.layer, config.select == "cls_patch"
        depth = num_blocks(visual)
        if not -depth <= self.layer < depth:
            raise ConfigError(f"tower.layer is {self.layer} but the tower has {depth} blocks"
                              f" (use {-depth}..{depth - 1}; -2 is LLaVA-1.5's penultimate block)")

    @property
    def width(self) -> int:
        """The token width: the transformer's embedding size (768 for ViT-B)."""
        trunk = getattr(self.visual, "trunk", None)
        return trunk.embed_dim if trunk is not None else self.visual.transformer.width

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> ``(1, 3, H, W)`` with the model's own open_clip transform."""
        return self.preprocess_fn(model_ready(image).convert("RGB")).unsqueeze(0)

    def input_view(self, image: Image.Image) -> tuple[Image.Image, str]:
        """The PIL steps of the open_clip transform (resize, crop) applied to ``image``, and the sized ones' names."""
        steps = []
        view = model_ready(image).convert("RGB")
        for step in getattr(self.preprocess_fn, "transforms", []):
            out = step(view)
            if not isinstance(out, Image.Image):  # ToTensor: the rest is normalisation
                break
            view = out
            if hasattr(step, "size"):
                steps.append(f"{type(step).__name__}({step.size})")
        return view, " then ".join(steps) + f" (open_clip's preprocessing) -> {view.width}×{view.height}"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        out = self.visual.forward_intermediates(
            pixel_values.to(dtype), indices=[self.layer], stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=self.keep_cls)
        tokens = out["image_intermediates"][0]
        if self.keep_cls:  # LLaVA's cls_patch: the class token(s) first, then the patches
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens


def num_blocks(visual: nn.Module) -> int:
    """Transformer blocks of an open_clip image tower (timm trunk or open_clip's own ViT)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):
        return len(trunk.blocks)
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):
        return len(transformer.resblocks)
    raise ConfigError(f"the open_clip image tower {type(visual).__name__} is not a transformer with patch tokens"
                      " (the llava family needs a ViT tower)")


def load_tower(folder: str | Path, config: TowerConfig, device: torch.device, dtype: torch.dtype) -> PatchTokenTower:
    """Load the open_clip model in ``folder``, keep its image tower only, frozen on ``device``."""
    model, preprocess = load_open_clip(folder, config.text_config)
    tower = PatchTokenTower(model.visual, preprocess, config)
    del model  # the text tower is not needed
    tower = tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
    log.info("vision tower loaded: %d blocks, width %d, layer %d, %s", num_blocks(tower.visual), tower.width,
             tower.layer, "cls+patch" if tower.keep_cls else "patch")
    return tower


DEFAULT_TIMM_TRUNK = "vit_base_patch16_224"  # BiomedCLIP's, assumed when the tower folder is not present


def meta_trunk(folder: Path | None) -> tuple[nn.Module, list[str]]:
    """The tower's timm trunk built on the meta device (no weights read), to size it; and what was assumed.

    From the folder's ``open_clip_config.json`` when present (timm towers), else BiomedCLIP's ViT-B/16.
    """
    import json

    import timm

    notes, name = [], DEFAULT_TIMM_TRUNK
    if folder is None:
        notes.append(f"vision tower not present: assumed BiomedCLIP's ViT-B/16 ({DEFAULT_TIMM_TRUNK})")
    else:
        vision_cfg = json.loads((Path(folder) / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
        if not vision_cfg.get("timm_model_name"):
            raise ConfigError(f"{folder}: the memory estimate knows timm towers only")
        name = vision_cfg["timm_model_name"]
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0), notes


def tower_config_repos(config: Config) -> dict[str, str]:
    """Hub repos of the vision tower's text-tower config/tokenizer (for ``fetch``)."""
    if config.tower.text_config:
        return {}
    folder = local_tower(config)
    if folder is None:
        return {}
    return {f"weights.vision_tower text tower ({key})": repo for key, repo in text_tower_repos(folder).items()}


def local_tower(config: Config) -> Path | None:
    """The vision tower's folder if it is here (locally or in the cache), without downloading."""
    try:
        return resolve_weights(config.weights.vision_tower, "weights.vision_tower", cache_dir=config.weights.cache_dir)
    except MissingWeightsError:
        return None

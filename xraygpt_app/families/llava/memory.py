"""The llava family's share of the memory estimate (``xraygpt_app.memory``): open_clip tower and projector."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from ...config import Config
from ...memory import TrainImageSide, TrainShape
from ...placement import Placement
from .model import build_projector
from .tower import local_tower, meta_trunk


def image_side_bytes(config: Config, placement: Placement, llm_config: PretrainedConfig,
                     notes: list[str]) -> tuple[int, int, int]:
    """The open_clip tower's timm trunk in the vision dtype, the projector in the LLM dtype, one image's activations.

    The "qformer" part holds the projector. Loading briefly also holds open_clip's text tower
    (BiomedCLIP: PubMedBERT, about 0.4 GiB in float32), freed before the LLM loads.
    """
    trunk, assumed = meta_trunk(local_tower(config))
    notes += assumed
    with torch.device("meta"):
        projector = build_projector(config.projector.type, trunk.embed_dim, llm_config.hidden_size)
    vision_bytes = sum(p.numel() for p in trunk.parameters()) * placement.vision_dtype.itemsize
    projector_bytes = sum(p.numel() for p in projector.parameters()) * placement.llm_dtype.itemsize
    tokens = trunk.patch_embed.num_patches + trunk.num_prefix_tokens
    element = placement.vision_dtype.itemsize
    heads = trunk.blocks[0].attn.num_heads
    activations = tokens * (4 * trunk.embed_dim + 2 * 4 * trunk.embed_dim) * element + heads * tokens * tokens * 4
    return vision_bytes, projector_bytes, activations


def train_image_side(config: Config, placement: Placement, llm_config: PretrainedConfig, shape: TrainShape,
                     notes: list[str]) -> TrainImageSide:
    """The frozen tower; the projector trains in float32 (stage 1 and 2 alike)."""
    vision_bytes, projector_bytes, activations = image_side_bytes(config, placement, llm_config, notes)
    trunk, _ = meta_trunk(local_tower(config))
    trainable = projector_bytes // placement.llm_dtype.itemsize
    return TrainImageSide(vision_bytes, trainable * 4, trainable, trunk.patch_embed.num_patches, activations)

"""The XrayGPT family's share of the memory estimate (``xraygpt_app.memory``): EVA ViT and Q-Former."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from ...config import Config
from ...memory import TrainImageSide, TrainShape, tensor_bytes, vision_activation_bytes
from ...placement import Placement
from .model import build_parts
from .qformer import cast_bridge
from .vision import cast_vision


def image_side_bytes(config: Config, placement: Placement, llm_config: PretrainedConfig,
                     notes: list[str]) -> tuple[int, int, int]:
    """EVA ViT + ln_vision, Q-Former + llama_proj, one image's ViT activations."""
    with torch.device("meta"):
        vision, bridge = build_parts(config)
    return (tensor_bytes(cast_vision(vision, placement)), tensor_bytes(cast_bridge(bridge, placement)),
            vision_activation_bytes(config, placement))


def train_image_side(config: Config, placement: Placement, llm_config: PretrainedConfig, shape: TrainShape,
                     notes: list[str]) -> TrainImageSide:
    """The frozen ViT (fp16 as XrayGPT), the float32 bridge; ``llama_proj`` (+ the Q-Former) trains."""
    with torch.device("meta"):
        vision, bridge = build_parts(config)
    trainable = sum(p.numel() for p in bridge.llama_proj.parameters())
    if shape.train_qformer:
        trainable += sum(p.numel() for p in bridge.qformer.parameters()) + bridge.query_tokens.numel()
    return TrainImageSide(tensor_bytes(cast_vision(vision, placement)), tensor_bytes(bridge.float()), trainable,
                          config.qformer.num_query_tokens, vision_activation_bytes(config, placement))

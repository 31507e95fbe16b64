"""BLIP-2 Q-Former (transformers ``Blip2QFormerModel``), its query tokens and the LLM projection."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from ...config import QFormerConfig
from ...placement import Placement


def qformer_config(config: QFormerConfig, vision_width: int) -> Blip2QFormerConfig:
    """The BERT-base Q-Former XrayGPT builds (``init_Qformer``), as a transformers config."""
    return Blip2QFormerConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        layer_norm_eps=config.layer_norm_eps, cross_attention_frequency=config.cross_attention_freq,
        encoder_hidden_size=vision_width, max_position_embeddings=config.max_position_embeddings,
        vocab_size=config.vocab_size,
    )


class VisionLanguageBridge(nn.Module):
    """Query tokens -> Q-Former (cross-attending to the image) -> ``llama_proj`` into the LLM."""

    def __init__(self, config: QFormerConfig, vision_width: int, llm_hidden: int):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        self.qformer = Blip2QFormerModel(qformer_config(config, vision_width))
        self.llama_proj = nn.Linear(config.hidden_size, llm_hidden)

    def forward(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (Q-Former last hidden state, projected LLM input embeddings)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        hidden = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=image_mask).last_hidden_state
        return hidden, self.llama_proj(hidden)


def cast_bridge(bridge: VisionLanguageBridge, placement: Placement) -> VisionLanguageBridge:
    """Float32 as the reference keeps it; on CUDA its Linear layers in float16.

    The reference runs the bridge under fp16 autocast on a GPU, which casts Linear weights to
    float16 for every call anyway: storing them in float16 gives the same numbers in half the
    memory. LayerNorms and the query tokens stay float32.
    """
    bridge.float()
    if placement.bridge_autocast_dtype is not None:
        for module in bridge.modules():
            if isinstance(module, nn.Linear):
                module.half()
    return bridge

"""The one table of model families: what each one is, where its code lives, what it reads.

Everything that differs by family is looked up here (config validation, the weights to fetch and
check, the memory estimate, the trainer, the app's loading message), so a new family is its own
package under ``families/`` plus one entry in :data:`FAMILIES`. Pure data: importing this module
imports nothing heavy; the "module:attribute" references load on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

# Vicuna-7B (LLaMA-7B) dimensions: XrayGPT's LLM when its folder (config.json) is not present.
VICUNA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)
# TinyLlama-1.1B-Chat-v1.0 (eval_configs/biomedclip_tinyllama.yaml), for the llava family
TINYLLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                    intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    tie_word_embeddings=False)


@dataclass(frozen=True)
class FamilySpec:
    """One model family: its classes (as "module:attribute"), its config and weights, its usual LLM."""

    name: str  # the value of ``model.family``
    title: str  # for people: the app's and CLI's messages
    parts: str  # what loading it means, e.g. "vision encoder, Q-Former, language model"
    model: str  # the loaded chat model (implements families.ChatModel), with a ``load(config, download)``
    trainable: str  # the fine-tuning wrapper (a train.family subclass), with a ``from_config(config, train)``
    image_memory: str  # (config, placement, llm_config, notes) -> (vision, bridge, activation) bytes
    train_memory: str  # (config, placement, llm_config, shape, notes) -> memory.TrainImageSide
    weights: tuple[str, ...]  # the WeightSpec fields of ``weights:`` it reads
    sections: tuple[str, ...]  # the config sections that describe its architecture
    default_llm: tuple[str, dict[str, Any]] = field(default=("Vicuna-7B", VICUNA_7B))  # when the LLM folder is absent
    config_repos: str | None = None  # (config) -> {entry: Hub repo} of config/tokenizer files ``fetch`` gets too

    def load(self, attribute: str) -> Any:
        """The object one of the "module:attribute" fields names (``"model"``, ``"trainable"``, ...)."""
        module, name = getattr(self, attribute).split(":")
        return getattr(importlib.import_module(module), name)


FAMILIES = {
    "xraygpt": FamilySpec(
        name="xraygpt",
        title="XrayGPT",
        parts="vision encoder, Q-Former, language model",
        model="xraygpt_app.families.xraygpt.model:XrayGPTModel",
        trainable="xraygpt_app.train.xraygpt_objective:XrayGPTTrainable",
        image_memory="xraygpt_app.families.xraygpt.memory:image_side_bytes",
        train_memory="xraygpt_app.families.xraygpt.memory:train_image_side",
        weights=("ckpt", "llama_model", "eva_vit_g", "blip2_qformer"),
        sections=("vision", "qformer", "llm"),
    ),
    "llava": FamilySpec(
        name="llava",
        title="LLaVA-style assistant",
        parts="vision tower, projector, language model",
        model="xraygpt_app.families.llava.model:LlavaModel",
        trainable="xraygpt_app.train.llava_objective:LlavaTrainable",
        image_memory="xraygpt_app.families.llava.memory:image_side_bytes",
        train_memory="xraygpt_app.families.llava.memory:train_image_side",
        weights=("vision_tower", "projector", "llama_model"),
        sections=("tower", "projector", "llm"),
        default_llm=("TinyLlama-1.1B-Chat", TINYLLAMA_1B),
        config_repos="xraygpt_app.families.llava.tower:tower_config_repos",
    ),
}


def family_spec(name: str) -> FamilySpec:
    """The entry of ``model.family`` ``name`` (the config has checked it is one of :data:`FAMILIES`)."""
    return FAMILIES[name]

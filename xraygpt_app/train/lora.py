"""LoRA / QLoRA adapters on the LLM with peft, and gradient checkpointing when the LLM trains."""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoints import CheckpointKeyError
from ..llm import peft_without_deprecation_notice
from .config import TrainConfig


def add_lora(llm: nn.Module, settings: TrainConfig) -> nn.Module:
    """Wrap the LLM with peft LoRA adapters (on a quantised base: peft's k-bit preparation first)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = settings.lora
    if settings.quantization != "none":
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=settings.gradient_checkpointing)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with peft_without_deprecation_notice():
        return get_peft_model(llm, config)


def enable_llm_training(llm: nn.Module, checkpointing: bool) -> None:
    """Gradient checkpointing for a training LLM (non-reentrant: the frozen embeddings need no hook)."""
    if checkpointing:
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def lora_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's names, on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(llm).items()}


def set_lora_state(llm: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Load adapter weights saved by :func:`lora_state`; every adapter key must be present."""
    from peft import set_peft_model_state_dict

    if not state:
        raise CheckpointKeyError("resume: this run trains LoRA adapters but the checkpoint holds none")
    result = set_peft_model_state_dict(llm, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointKeyError(f"resume: LoRA keys missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}")

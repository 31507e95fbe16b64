"""What the trainer needs from a model family (XrayGPT here; a LLaVA-style family plugs in the same way)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn


@dataclass
class TrainingBatch:
    """One batch as the causal LM takes it: labels are -100 wherever no loss is taken."""

    inputs_embeds: torch.Tensor  # (batch, length, hidden)
    attention_mask: torch.Tensor  # (batch, length), 0 on padding
    labels: torch.Tensor  # (batch, length)

    @property
    def target_tokens(self) -> torch.Tensor:
        """How many tokens carry loss (for tokens/s), as a tensor so it can be reduced across processes."""
        return (self.labels != -100).sum()


@runtime_checkable
class TrainableFamily(Protocol):
    """A model family the trainer can fine-tune. It is an ``nn.Module`` whose ``forward`` takes
    ``(pixel_values, instructions, targets)`` and returns ``(mean token loss, target token count)``;
    the trainer wraps it with ``accelerate`` (DDP across processes) and never looks inside.
    """

    family: str  # a short name, written into the checkpoint's config
    checkpoint_weight: str  # the config key that serves its checkpoints (weights.ckpt, weights.projector)
    instructions: list[str]  # instructions drawn (one per batch) for rows without a question
    llm: nn.Module  # the causal LM, possibly peft-wrapped

    def image_transform(self, augment: bool) -> Callable[[Image.Image], torch.Tensor]: ...

    def training_batch(self, pixel_values: torch.Tensor, instructions: list[str],
                       targets: list[str]) -> TrainingBatch: ...

    def named_trainable(self) -> dict[str, nn.Parameter]: ...

    def checkpoint_state(self) -> dict[str, torch.Tensor]: ...

    def load_checkpoint_state(self, state: dict[str, torch.Tensor],
                              lora: dict[str, torch.Tensor] | None) -> None: ...

    def adapter_state(self) -> dict[str, torch.Tensor] | None: ...

    def save_adapter(self, folder: Path) -> None: ...

    def generate_report(self, image: Image.Image, max_new_tokens: int) -> str: ...

    def __call__(self, pixel_values: torch.Tensor, instructions: list[str],
                 targets: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

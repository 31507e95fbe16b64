"""The llava family's fine-tuning objective (LLaVA-1.5's, on the project's loaded model).

Stage 1 trains the projector only, on report or caption pairs; stage 2 (``train.lora.enabled``)
trains the projector and LoRA adapters on the LLM, on instruction / VQA pairs. Both use the same
data as XrayGPT's fine-tuning; the family changes only the prompt and what trains.

Per row: the prompt is the LLM's own chat template with ``<image>\\n{question}`` as the user message
and the generation prompt (exactly what the app feeds at inference, ``ChatTemplate.render``); the
target is the answer followed by the template's end-of-turn marker (``</s>`` for TinyLlama,
``<|im_end|>`` for ChatML), tokenized without special tokens and cut at ``max_txt_len``; the input is
``prompt before the image + projected patch tokens + prompt after + target``, right-padded; labels
are -100 everywhere but on the target tokens (the end-of-turn included, so the model learns to stop:
unlike XrayGPT's objective, a target token equal to the pad id keeps its loss); the loss is the
LLM's mean token cross-entropy. Rows without a question draw an instruction from XrayGPT's list
with its ``<Img><ImageHere></Img>`` marker removed (the image goes where the template puts it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from PIL import Image
from torch import nn

from ..config import Config
from ..families.llava.model import LlavaModel
from .config import TrainConfig
from .family import ChatTrainable, plain_instructions
from .lora import add_lora, enable_llm_training

log = logging.getLogger(__name__)

PROJECTOR_PREFIX = "mm_projector."  # LLaVA's checkpoint names for the projector


class LlavaTrainable(ChatTrainable):
    """The loaded llava-family model as a trainable family (see :mod:`xraygpt_app.train.family`)."""

    family = "llava"
    checkpoint_weight = "weights.projector"  # the config key that serves a checkpoint of this family

    def __init__(self, model: LlavaModel, settings: TrainConfig):
        super().__init__(settings)
        self.model = model
        self.tower, self.projector, self.llm = model.tower, model.projector, model.llm
        self.tokenizer = model.tokenizer
        self.instructions = plain_instructions(settings.instructions)  # the chat template places the image

    @classmethod
    def from_config(cls, config: Config, settings: TrainConfig) -> LlavaTrainable:
        """Load the model through the app's own path and mark what trains."""
        torch.manual_seed(settings.seed)  # a new projector (stage 1, no weights.projector) starts the same every run
        family = cls(LlavaModel.load(config, new_projector=True), settings)
        family.configure_trainable()
        return family

    def configure_trainable(self) -> None:
        """The projector (in float32) always; LoRA adapters on the LLM in stage 2."""
        self.projector.float().requires_grad_(True)
        if self.settings.lora.enabled:
            self.llm = self.model.llm = add_lora(self.llm, self.settings)
            enable_llm_training(self.llm, self.settings.gradient_checkpointing)

    def train(self, mode: bool = True) -> LlavaTrainable:
        """The frozen tower stays in eval mode."""
        super().train(mode)
        self.tower.eval()
        return self

    def resume_parameters(self) -> dict[str, nn.Parameter]:
        """The projector under LLaVA's names (``mm_projector.0.weight`` ...): what ``weights.projector`` reads."""
        return {PROJECTOR_PREFIX + n: p for n, p in self.projector.named_parameters()}

    def image_transform(self, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
        """open_clip's own transforms for this tower: its training augmentation, or the app's eval preprocessing."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.tower.visual.preprocess_cfg), is_train=augment)

    # --- the objective ----------------------------------------------------------------------------
    def row_ids(self, instruction: str, target: str) -> tuple[list[int], list[int], list[int]]:
        before, after = self._prompt_ids(instruction)
        end = self.model.template.end_of_turn or self.tokenizer.eos_token
        ids = self.tokenizer(target + end, add_special_tokens=False, truncation=True,
                             max_length=self.settings.max_txt_len)["input_ids"]
        return before, after, ids

    @functools.lru_cache(maxsize=64)  # noqa: B019  (a handful of prompts per run; the model lives as long)
    def _prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        segments = self.model.render_prompt([], question)
        return segments.before, segments.after

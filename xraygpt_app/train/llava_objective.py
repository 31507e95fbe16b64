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

from ..checkpoints import CheckpointKeyError
from ..config import Config
from ..families.llava.model import LlavaModel
from ..families.xraygpt.conversation import IMAGE_MESSAGE
from .config import TrainConfig
from .family import TrainingBatch
from .lora import add_lora, enable_llm_training, set_lora_state
from .xraygpt_objective import IGNORE_INDEX, XrayGPTTrainable, read_instructions

log = logging.getLogger(__name__)

PROJECTOR_PREFIX = "mm_projector."  # LLaVA's checkpoint names for the projector


class LlavaTrainable(nn.Module):
    """The loaded llava-family model as a trainable family (see :mod:`xraygpt_app.train`)."""

    family = "llava"
    checkpoint_weight = "weights.projector"  # the config key that serves a checkpoint of this family

    def __init__(self, model: LlavaModel, settings: TrainConfig):
        super().__init__()
        self.model, self.settings = model, settings
        self.tower, self.projector, self.llm = model.tower, model.projector, model.llm
        self.tokenizer = model.tokenizer
        self.instructions = [line.replace(IMAGE_MESSAGE, "").strip()
                             for line in read_instructions(settings.instructions)]

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

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The projector under LLaVA's names (``mm_projector.0.weight`` ...), LoRA under peft's."""
        out = {PROJECTOR_PREFIX + n: p for n, p in self.projector.named_parameters() if p.requires_grad}
        out.update({n: p for n, p in self.llm.named_parameters() if p.requires_grad})
        return out

    def image_transform(self, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
        """open_clip's own transforms for this tower: its training augmentation, or the app's eval preprocessing."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.tower.visual.preprocess_cfg), is_train=augment)

    # --- the objective ----------------------------------------------------------------------------
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen tower's patch tokens through the projector (with gradients)."""
        placement = self.model.placement
        with torch.no_grad():
            tokens = self.tower(pixel_values.to(placement.vision_device))
        return self.projector(tokens.float().to(placement.llm_device))

    def training_batch(self, pixel_values: torch.Tensor, instructions: list[str], targets: list[str]
                       ) -> TrainingBatch:
        """Inputs, attention mask and labels for one batch (see the module docstring)."""
        images = self.image_tokens(pixel_values)
        embed = self.llm.get_input_embeddings()
        rows = [(*self._prompt_ids(q), self._target_ids(t)) for q, t in zip(instructions, targets, strict=True)]
        length = max(len(b) + images.shape[1] + len(a) + len(t) for b, a, t in rows)
        pad, device = self.tokenizer.pad_token_id, images.device
        embeds, masks, labels = [], [], []
        for image, (before, after, target) in zip(images, rows, strict=True):
            used = len(before) + image.shape[0] + len(after) + len(target)
            text = embed(torch.tensor(before + after + target + [pad] * (length - used), device=device))
            embeds.append(torch.cat([text[:len(before)], image.to(text.dtype), text[len(before):]]))
            masks.append(torch.tensor([1] * used + [0] * (length - used), device=device))
            labels.append(torch.tensor([IGNORE_INDEX] * (used - len(target)) + target
                                       + [IGNORE_INDEX] * (length - used), device=device))
        return TrainingBatch(torch.stack(embeds), torch.stack(masks), torch.stack(labels))

    @functools.lru_cache(maxsize=64)  # noqa: B019  (a handful of prompts per run; the model lives as long)
    def _prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        segments = self.model.render_prompt([], question)
        return segments.before, segments.after

    def _target_ids(self, target: str) -> list[int]:
        end = self.model.template.end_of_turn or self.tokenizer.eos_token
        return self.tokenizer(target + end, add_special_tokens=False, truncation=True,
                              max_length=self.settings.max_txt_len)["input_ids"]

    # --- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """A checkpoint's ``'model'`` entry: the projector under LLaVA's names (what ``weights.projector`` reads)."""
        return {PROJECTOR_PREFIX + n: p.detach().float().cpu().clone() for n, p in self.projector.named_parameters()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor] | None) -> None:
        """Put a checkpoint's projector (and LoRA weights) back, for ``--resume``; every key must be ours."""
        params = {PROJECTOR_PREFIX + n: p for n, p in self.projector.named_parameters()}
        if set(state) != set(params):
            raise CheckpointKeyError(f"resume: the checkpoint's trained keys {sorted(state)[:6]} do not match"
                                     f" this run's {sorted(params)[:6]}")
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
        if self.settings.lora.enabled:
            set_lora_state(self.llm, lora)

    # The same as XrayGPT's family: they read only ``training_batch``, ``settings``, ``llm`` and ``model``.
    forward = XrayGPTTrainable.forward  # (mean token loss, number of target tokens) for one batch
    adapter_state = XrayGPTTrainable.adapter_state
    save_adapter = XrayGPTTrainable.save_adapter
    generate_report = XrayGPTTrainable.generate_report

"""XrayGPT's fine-tuning objective, exactly its ``MiniGPT4.forward``, on the project's loaded model.

Per batch: the instruction is wrapped in ``'###Patient: {} ###Doctor: '`` and split at
``<ImageHere>``; the target is ``caption + '###'``, tokenized without special tokens and cut at
``max_txt_len`` (160); the input is ``[BOS] + prompt before the image + image tokens + prompt after
+ target``, right-padded with pad = ``</s>``; labels are -100 everywhere but on target tokens
(padding included); the loss is the LLM's mean token cross-entropy.

Instructions: XrayGPT draws one per batch from ``prompts/alignment.txt`` (the lines holding
``<ImageHere>``; shipped here as ``xraygpt_alignment.txt``). A VQA row's own question is its
instruction, in the same form: ``'###Patient: <Img><ImageHere></Img> ' + question + ' ###Doctor: '``.
XrayGPT meant to do that too, but its test ``hasattr(samples, 'question_split')`` is made on a
dict, so it never fires and its VQA rows were trained with a random report instruction.

With one prompt per batch (XrayGPT's case) each row is laid out exactly as XrayGPT lays out the
batch; rows with their own questions get their own prompt lengths and are right-padded as a whole.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from PIL import Image
from torch import nn

from ..config import Config, VisionConfig
from ..families.xraygpt.checkpoints import export_bridge_key
from ..families.xraygpt.conversation import IMAGE_MESSAGE, IMAGE_PLACEHOLDER, split_on_image
from ..families.xraygpt.model import XrayGPTModel
from ..families.xraygpt.vision import build_preprocess, build_train_transform
from .config import TrainConfig
from .family import IGNORE_INDEX, INSTRUCTIONS_FILE, ChatTrainable, read_instructions
from .lora import add_lora, enable_llm_training

log = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "INSTRUCTIONS_FILE", "XrayGPTTrainable", "read_instructions", "wrap_instruction"]


def wrap_instruction(instruction: str, template: str) -> str:
    """An instruction line (image included) or a VQA question, in XrayGPT's prompt template."""
    if IMAGE_PLACEHOLDER not in instruction:
        instruction = f"{IMAGE_MESSAGE} {instruction}"
    return template.format(instruction)


def image_transform(config: VisionConfig, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform, or the deterministic eval transform the app uses."""
    return build_train_transform(config) if augment else build_preprocess(config)


class XrayGPTTrainable(ChatTrainable):
    """The loaded XrayGPT as a trainable family (see :mod:`xraygpt_app.train.family` for the interface)."""

    family = "xraygpt"
    checkpoint_weight = "weights.ckpt"  # the config key that serves a checkpoint of this family
    mask_pad_targets = True  # XrayGPT masks by pad id, so a target token equal to </s> carries no loss either

    def __init__(self, model: XrayGPTModel, settings: TrainConfig):
        super().__init__(settings)
        self.model = model
        self.vision, self.bridge, self.llm = model.vision, model.bridge, model.llm
        self.tokenizer = model.tokenizer
        self.instructions = read_instructions(settings.instructions)

    @classmethod
    def from_config(cls, config: Config, settings: TrainConfig) -> XrayGPTTrainable:
        """Load the model through the app's own path and mark what trains."""
        family = cls(XrayGPTModel.load(config), settings)
        family.configure_trainable()
        return family

    # --- what trains ----------------------------------------------------------------------------
    def configure_trainable(self) -> None:
        """``llama_proj`` always (XrayGPT's default); Q-Former + query tokens and LoRA on request."""
        self.bridge.float()  # XrayGPT keeps the bridge in float32 and trains it under autocast
        self.bridge.llama_proj.requires_grad_(True)
        if self.settings.train_qformer:
            self.bridge.qformer.requires_grad_(True)
            self.bridge.query_tokens.requires_grad_(True)
        if self.settings.lora.enabled:
            self.llm = self.model.llm = add_lora(self.llm, self.settings)
            enable_llm_training(self.llm, self.settings.gradient_checkpointing)

    def train(self, mode: bool = True) -> XrayGPTTrainable:
        """Frozen parts stay in eval mode (XrayGPT disables their ``train()``)."""
        super().train(mode)
        self.vision.eval()
        if not self.settings.train_qformer:
            self.bridge.qformer.eval()
        return self

    def resume_parameters(self) -> dict[str, nn.Parameter]:
        """Trained bridge parameters under XrayGPT's checkpoint names (its checkpoint's ``'model'`` entry)."""
        return {export_bridge_key(n): p for n, p in self.bridge.named_parameters() if p.requires_grad}

    def image_transform(self, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
        """XrayGPT's ``blip2_image_train`` transform, or the app's deterministic eval transform."""
        return image_transform(self.model.config.vision, augment)

    # --- the objective ----------------------------------------------------------------------------
    def prompt_for(self, instruction: str) -> str:
        """XrayGPT's template around an instruction line or a VQA question."""
        return wrap_instruction(instruction, self.settings.prompt_template)

    def row_ids(self, instruction: str, target: str) -> tuple[list[int], list[int], list[int]]:
        before, after = self._prompt_ids(self.prompt_for(instruction))
        ids = self.tokenizer(target + self.settings.end_sym, add_special_tokens=False, truncation=True,
                             max_length=self.settings.max_txt_len)["input_ids"]
        return before, after, ids

    @functools.lru_cache(maxsize=64)  # noqa: B019  (a handful of prompts per run; the model lives as long)
    def _prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        before, after = split_on_image(prompt)
        encode = functools.partial(self.tokenizer, add_special_tokens=False)
        return [self.tokenizer.bos_token_id] + encode(before)["input_ids"], encode(after)["input_ids"]

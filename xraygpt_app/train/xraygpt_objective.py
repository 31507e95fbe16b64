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
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..chat import ChatSession
from ..checkpoints import CheckpointKeyError, export_bridge_key
from ..config import Config
from ..errors import ConfigError
from ..families import DEFAULT_REPORT_QUESTION
from ..families.xraygpt.conversation import IMAGE_MESSAGE, IMAGE_PLACEHOLDER, split_on_image
from ..families.xraygpt.model import XrayGPTModel
from .config import TrainConfig
from .data import image_transform
from .family import TrainingBatch
from .lora import add_lora, enable_llm_training, lora_state, set_lora_state

log = logging.getLogger(__name__)

INSTRUCTIONS_FILE = Path(__file__).with_name("xraygpt_alignment.txt")
IGNORE_INDEX = -100  # transformers' label for "no loss here"


def read_instructions(path: str | Path | None = None) -> list[str]:
    """The instruction lines of an ``alignment.txt``-style file: those holding ``<ImageHere>``."""
    path = Path(path) if path else INSTRUCTIONS_FILE
    if not path.is_file():
        raise ConfigError(f"train.instructions: file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if IMAGE_PLACEHOLDER in line]
    if not lines:
        raise ConfigError(f"train.instructions: {path} has no line holding {IMAGE_PLACEHOLDER}")
    return lines


def wrap_instruction(instruction: str, template: str) -> str:
    """An instruction line (image included) or a VQA question, in XrayGPT's prompt template."""
    if IMAGE_PLACEHOLDER not in instruction:
        instruction = f"{IMAGE_MESSAGE} {instruction}"
    return template.format(instruction)


class XrayGPTTrainable(nn.Module):
    """The loaded XrayGPT as a trainable family (see :mod:`xraygpt_app.train` for the interface)."""

    family = "xraygpt"
    checkpoint_weight = "weights.ckpt"  # the config key that serves a checkpoint of this family

    def __init__(self, model: XrayGPTModel, settings: TrainConfig):
        super().__init__()
        self.model, self.settings = model, settings
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

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters under XrayGPT's checkpoint names (LoRA under peft's names)."""
        out = {export_bridge_key(n): p for n, p in self.bridge.named_parameters() if p.requires_grad}
        out.update({n: p for n, p in self.llm.named_parameters() if p.requires_grad})
        return out

    def image_transform(self, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
        """XrayGPT's ``blip2_image_train`` transform, or the app's deterministic eval transform."""
        return image_transform(self.model.config.vision, augment)

    # --- the objective ----------------------------------------------------------------------------
    def prompt_for(self, instruction: str) -> str:
        """XrayGPT's template around an instruction line or a VQA question."""
        return wrap_instruction(instruction, self.settings.prompt_template)

    def forward(self, pixel_values: torch.Tensor, instructions: list[str], targets: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean token loss, number of target tokens) for one batch."""
        batch = self.training_batch(pixel_values, instructions, targets)
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                       labels=batch.labels, use_cache=False)
        return out.loss, batch.target_tokens

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen ViT, then the Q-Former and ``llama_proj`` (with gradients where they train)."""
        placement = self.model.placement
        with torch.no_grad():
            vit = self.vision(pixel_values.to(placement.vision_device))
        return self.bridge(vit.float().to(placement.llm_device))[1]

    def training_batch(self, pixel_values: torch.Tensor, instructions: list[str], targets: list[str]
                       ) -> TrainingBatch:
        """Inputs, attention mask and labels of XrayGPT's ``forward`` for one batch."""
        images = self.image_tokens(pixel_values)
        embed = self.llm.get_input_embeddings()
        device = images.device
        rows = [self._row_ids(self.prompt_for(i), t) for i, t in zip(instructions, targets, strict=True)]
        length = max(len(b) + images.shape[1] + len(a) + len(t) for b, a, t in rows)
        pad = self.tokenizer.pad_token_id
        embeds, masks, labels = [], [], []
        for image, (before, after, target) in zip(images, rows, strict=True):
            n_pad = length - len(before) - image.shape[0] - len(after) - len(target)
            ids = torch.tensor(before + after + target + [pad] * n_pad, device=device)
            text = embed(ids)
            split = len(before)
            embeds.append(torch.cat([text[:split], image.to(text.dtype), text[split:]]))
            masks.append(torch.tensor([1] * (length - n_pad) + [0] * n_pad, device=device))
            # XrayGPT masks by pad id, so a target token equal to </s> carries no loss either.
            target_labels = [t if t != pad else IGNORE_INDEX for t in target]
            labels.append(torch.tensor([IGNORE_INDEX] * (length - n_pad - len(target)) + target_labels
                                       + [IGNORE_INDEX] * n_pad, device=device))
        return TrainingBatch(torch.stack(embeds), torch.stack(masks), torch.stack(labels))

    def _row_ids(self, prompt: str, target: str) -> tuple[list[int], list[int], list[int]]:
        before, after = self._prompt_ids(prompt)
        ids = self.tokenizer(target + self.settings.end_sym, add_special_tokens=False, truncation=True,
                             max_length=self.settings.max_txt_len)["input_ids"]
        return before, after, ids

    @functools.lru_cache(maxsize=64)  # noqa: B019  (a handful of prompts per run; the model lives as long)
    def _prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        before, after = split_on_image(prompt)
        encode = functools.partial(self.tokenizer, add_special_tokens=False)
        return [self.tokenizer.bos_token_id] + encode(before)["input_ids"], encode(after)["input_ids"]

    # --- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The ``'model'`` entry of XrayGPT's checkpoint: trained bridge parameters under its keys."""
        return {export_bridge_key(n): p.detach().float().cpu().clone()
                for n, p in self.bridge.named_parameters() if p.requires_grad}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor] | None) -> None:
        """Put a checkpoint's trained parameters back (for ``--resume``); every key must be ours."""
        params = {export_bridge_key(n): p for n, p in self.bridge.named_parameters() if p.requires_grad}
        unknown = sorted(set(state) - set(params))
        if unknown or set(params) - set(state):
            raise CheckpointKeyError(f"resume: the checkpoint's trained keys {sorted(state)[:6]} do not match"
                                     f" this run's {sorted(params)[:6]}")
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
        if self.settings.lora.enabled:
            set_lora_state(self.llm, lora)

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The LoRA weights (peft names), or None without LoRA."""
        return lora_state(self.llm) if self.settings.lora.enabled else None

    def save_adapter(self, folder: Path) -> None:
        """Write the LoRA adapter in peft's own format (``adapter_config.json`` + safetensors)."""
        self.llm.save_pretrained(str(folder))

    # --- evaluation -------------------------------------------------------------------------------
    def generate_report(self, image: Image.Image, max_new_tokens: int) -> str:
        """A greedy first-turn report through the app's chat engine (for the end-of-run metrics)."""
        session = ChatSession(self.model, self.model.encode_image(image), reuse_kv=False)
        return session.ask(DEFAULT_REPORT_QUESTION, do_sample=False, max_new_tokens=max_new_tokens).answer

"""The base every trainable model derives from, and the shared part of the chat families' objectives.

:class:`TrainableFamily` is what the trainer knows of a model: how rows become batches, the
forward pass that returns ``(loss, count)``, the trainable parameters under the model's released
names, the checkpoint entry and resume, adapters, what is written beside a checkpoint, and the
end-of-run evaluation. :class:`ChatTrainable` adds what XrayGPT and the llava family share: one
instruction per batch, the ``prompt before + image tokens + prompt after + target`` layout with
right padding and :data:`IGNORE_INDEX` labels, the causal-LM loss, LoRA adapters and a greedy
report for the end-of-run metrics. The zero-shot models (``train.zeroshot``) derive from the base.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..chat import ChatSession
from ..checkpoints import CheckpointKeyError
from ..config import Config, ImageConfig
from ..errors import ConfigError
from ..families import DEFAULT_REPORT_QUESTION
from .batches import choose_instructions
from .config import TrainConfig
from .data import DataSummary, PairDataset, Sample, collate, read_samples
from .lora import lora_state, set_lora_state

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # transformers' label for "no loss here"
INSTRUCTIONS_FILE = Path(__file__).with_name("xraygpt_alignment.txt")
# The instruction file's format (XrayGPT's alignment.txt): instruction lines hold the image placeholder,
# wrapped in this marker; a family whose template places the image itself drops the marker.
INSTRUCTION_IMAGE_PLACEHOLDER = "<ImageHere>"
INSTRUCTION_IMAGE_MARKER = "<Img><ImageHere></Img>"


def read_instructions(path: str | Path | None = None) -> list[str]:
    """The instruction lines of an ``alignment.txt``-style file: those holding ``<ImageHere>``."""
    path = Path(path) if path else INSTRUCTIONS_FILE
    if not path.is_file():
        raise ConfigError(f"train.instructions: file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if INSTRUCTION_IMAGE_PLACEHOLDER in line]
    if not lines:
        raise ConfigError(f"train.instructions: {path} has no line holding {INSTRUCTION_IMAGE_PLACEHOLDER}")
    return lines


def plain_instructions(path: str | Path | None = None) -> list[str]:
    """The instruction lines without the image marker (for templates that place the image themselves)."""
    return [line.replace(INSTRUCTION_IMAGE_MARKER, "").strip() for line in read_instructions(path)]


@dataclass
class TrainingBatch:
    """One batch as the causal LM takes it: labels are IGNORE_INDEX wherever no loss is taken."""

    inputs_embeds: torch.Tensor  # (batch, length, hidden)
    attention_mask: torch.Tensor  # (batch, length), 0 on padding
    labels: torch.Tensor  # (batch, length)

    @property
    def target_tokens(self) -> torch.Tensor:
        """How many tokens carry loss (for tokens/s), as a tensor so it can be reduced across processes."""
        return (self.labels != IGNORE_INDEX).sum()


class TrainableFamily(nn.Module):
    """A model the trainer can fine-tune; the trainer wraps it with ``accelerate`` and never looks inside.

    ``forward(*inputs)`` takes what :meth:`step_inputs` makes of a loader batch and returns
    ``(mean loss, count)``: count is what the loss is averaged over (target tokens, rows), reported
    per second and used to weight the validation loss.
    """

    family: str  # a short name, written into the checkpoint's config
    checkpoint_weight: str  # the config key that serves its checkpoints (weights.ckpt, weights.projector...)
    count_name = "rows"  # what forward's count counts, as ``--loss-only`` names it
    loss_name = "training loss"  # the loss curve's axis
    loss_only_training_mode = False  # ``--loss-only`` runs in evaluation mode (deterministic) unless set

    def __init__(self, settings: TrainConfig):
        super().__init__()
        self.settings = settings

    # --- data ---------------------------------------------------------------------------------------
    @classmethod
    def read_data(cls, path: str | Path, skip_bad: bool, limits: ImageConfig | None) -> DataSummary:
        """Every usable row of a data file, checked (report / VQA pairs unless a family reads others)."""
        return read_samples(path, skip_bad=skip_bad, limits=limits)

    def image_transform(self, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
        raise NotImplementedError

    def dataset(self, samples: Sequence[Sample], augment: bool, limits: ImageConfig | None) -> Dataset:
        """Items ``(index, crop seed)`` -> one row's tensors (see :class:`~xraygpt_app.train.data.PairDataset`)."""
        return PairDataset(samples, self.image_transform(augment), limits)

    @staticmethod
    def collate(items: list) -> Any:
        return collate(items)

    def step_inputs(self, batch: Any, seed: int, iteration: int) -> tuple:
        """The arguments of ``forward`` for one training iteration's batch."""
        raise NotImplementedError

    def eval_inputs(self, batch: Any) -> tuple:
        """The arguments of ``forward`` for a validation batch (deterministic)."""
        raise NotImplementedError

    # --- what trains, checkpoints, resume -----------------------------------------------------------
    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Trainable parameters under the model's released names (the weight-decay rule reads them)."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The ``'model'`` entry of a checkpoint: trained tensors under the released names, on the CPU."""
        return {name: p.detach().float().cpu().clone() for name, p in self.named_trainable().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor] | None) -> None:
        """Put a checkpoint's trained tensors back (for ``--resume``); every key must be this run's."""
        params = self.resume_parameters()
        if set(state) != set(params):
            raise CheckpointKeyError(f"resume: the checkpoint's trained keys {sorted(state)[:6]} do not match"
                                     f" this run's {sorted(params)[:6]}")
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
        self.load_adapter_state(lora)

    def resume_parameters(self) -> dict[str, torch.Tensor]:
        """The tensors :meth:`checkpoint_state` saves, by name (without adapters)."""
        return dict(self.named_trainable())

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """Adapter weights a checkpoint carries beside ``'model'`` (LoRA), or None."""
        return None

    def load_adapter_state(self, state: dict[str, torch.Tensor] | None) -> None:
        """Put adapter weights back (for ``--resume``)."""

    def checkpoint_extras(self, config: Config) -> dict[str, Any]:
        """Entries a checkpoint carries beside the trainer's own (a released format's ``config``)."""
        return {}

    def save_epoch(self, output_dir: Path, epoch: int) -> Path | None:
        """Write what serves this epoch beside its checkpoint (an adapter, a released folder); its path."""
        return None

    # --- evaluation ---------------------------------------------------------------------------------
    def validation_metrics(self, val_samples: Sequence[Sample], config: Config) -> dict[str, Any] | None:
        """Numbers beyond the loss for the curves, at the start and after each epoch (zero-shot models: AUC)."""
        return None

    def end_of_run(self, val_samples: Sequence[Sample], config: Config, output_dir: Path) -> dict | None:
        """Metrics on the validation rows after training (written into ``output_dir``), or None."""
        return None

    def use_command(self, config_path: str, checkpoint: Path, export: Path | None) -> str:
        """The command that uses what the run wrote (printed at the end of ``finetune``)."""
        return f"xraygpt serve -c {config_path} --set {self.checkpoint_weight}={checkpoint}"


class ChatTrainable(TrainableFamily):
    """A chat family's objective: instruction + image + target through the causal LM (XrayGPT, llava).

    Subclasses give ``model`` (a ``families.ChatModel``), ``llm``, ``tokenizer``, ``instructions`` and
    :meth:`row_ids` (the prompt before and after the image, and the target ids of one row).
    """

    model: nn.Module  # the family's loaded chat model (what the app serves)
    llm: nn.Module  # the causal LM, possibly peft-wrapped
    tokenizer: Any
    instructions: list[str]  # drawn from (one per batch, seeded) for rows without a question
    count_name = "target_tokens"
    loss_name = "mean token cross-entropy"
    loss_only_training_mode = True  # XrayGPT's fixture was recorded with forward in training mode
    mask_pad_targets = False  # XrayGPT masks labels by pad id, so a target token equal to pad carries no loss

    def step_inputs(self, batch: tuple, seed: int, iteration: int) -> tuple:
        pixels, targets, questions = batch
        return pixels, choose_instructions(questions, self.instructions, seed, iteration), targets

    def eval_inputs(self, batch: tuple) -> tuple:
        pixels, targets, questions = batch
        return pixels, [q or self.instructions[0] for q in questions], targets

    def forward(self, pixel_values: torch.Tensor, instructions: list[str], targets: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean token loss, number of target tokens) for one batch."""
        batch = self.training_batch(pixel_values, instructions, targets)
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                       labels=batch.labels, use_cache=False)
        return out.loss, batch.target_tokens

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The chat model's own pixels -> LLM tokens step, in its training form (frozen vision, float32 bridge)."""
        return self.model.image_tokens(pixel_values, train=True)

    def row_ids(self, instruction: str, target: str) -> tuple[list[int], list[int], list[int]]:
        raise NotImplementedError

    def training_batch(self, pixel_values: torch.Tensor, instructions: list[str], targets: list[str]
                       ) -> TrainingBatch:
        """Inputs, attention mask and labels: ``before + image + after + target``, right-padded."""
        images = self.image_tokens(pixel_values)
        embed = self.llm.get_input_embeddings()
        rows = [self.row_ids(i, t) for i, t in zip(instructions, targets, strict=True)]
        length = max(len(b) + images.shape[1] + len(a) + len(t) for b, a, t in rows)
        pad, device = self.tokenizer.pad_token_id, images.device
        embeds, masks, labels = [], [], []
        for image, (before, after, target) in zip(images, rows, strict=True):
            used = len(before) + image.shape[0] + len(after) + len(target)
            text = embed(torch.tensor(before + after + target + [pad] * (length - used), device=device))
            embeds.append(torch.cat([text[:len(before)], image.to(text.dtype), text[len(before):]]))
            masks.append(torch.tensor([1] * used + [0] * (length - used), device=device))
            target_labels = [IGNORE_INDEX if self.mask_pad_targets and t == pad else t for t in target]
            labels.append(torch.tensor([IGNORE_INDEX] * (used - len(target)) + target_labels
                                       + [IGNORE_INDEX] * (length - used), device=device))
        return TrainingBatch(torch.stack(embeds), torch.stack(masks), torch.stack(labels))

    # --- adapters -----------------------------------------------------------------------------------
    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The bridge / projector under the family's checkpoint names, LoRA under peft's."""
        out = dict(self.resume_parameters())
        out.update({n: p for n, p in self.llm.named_parameters() if p.requires_grad})
        return out

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().float().cpu().clone() for name, p in self.resume_parameters().items()}

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The LoRA weights (peft names), or None without LoRA."""
        return lora_state(self.llm) if self.settings.lora.enabled else None

    def load_adapter_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.settings.lora.enabled:
            set_lora_state(self.llm, state)

    def save_adapter(self, folder: Path) -> None:
        """Write the LoRA adapter in peft's own format (``adapter_config.json`` + safetensors)."""
        self.llm.save_pretrained(str(folder))

    def save_epoch(self, output_dir: Path, epoch: int) -> Path | None:
        if not self.settings.lora.enabled:
            return None
        from .outputs import save_folder_atomically

        folder = output_dir / f"lora_adapter_{epoch}"
        save_folder_atomically(self.save_adapter, folder)
        return folder

    # --- evaluation ---------------------------------------------------------------------------------
    def generate_report(self, image: Image.Image, max_new_tokens: int) -> str:
        """A greedy first-turn report through the app's chat engine (for the end-of-run metrics)."""
        session = ChatSession(self.model, self.model.encode_image(image), reuse_kv=False)
        return session.ask(DEFAULT_REPORT_QUESTION, do_sample=False, max_new_tokens=max_new_tokens).answer

    def use_command(self, config_path: str, checkpoint: Path, export: Path | None) -> str:
        command = super().use_command(config_path, checkpoint, export)
        return command + (f" --set weights.lora={export}" if export else "")

    def end_of_run(self, val_samples: Sequence[Sample], config: Config, output_dir: Path) -> dict | None:
        from .evaluate import report_scores

        return report_scores(self, val_samples, config, self.settings, output_dir / "report_metrics.json")

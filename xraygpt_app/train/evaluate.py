"""Numbers about a model being trained: validation loss, report metrics, and ``--loss-only`` batches."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..evaluation.metrics import report_metrics
from ..imaging.loader import load_radiograph
from .batches import choose_instructions
from .config import TrainConfig
from .data import PairDataset, Sample, collate

log = logging.getLogger(__name__)


def _batches(family: nn.Module, samples: Sequence[Sample], config: Config, batch_size: int):
    """File-order batches through the family's deterministic eval transform."""
    dataset = PairDataset(samples, family.image_transform(augment=False), config.image)
    for first in range(0, len(samples), batch_size):
        yield collate([dataset[(i, 0)] for i in range(first, min(first + batch_size, len(samples)))])


@torch.no_grad()
def validation_loss(family: nn.Module, samples: Sequence[Sample], config: Config, train: TrainConfig) -> float | None:
    """Token-weighted mean loss over the validation rows (eval transform, the first instruction)."""
    if not samples:
        return None
    family.eval()
    total, tokens = 0.0, 0
    for pixels, targets, questions in _batches(family, samples, config, train.batch_size):
        instructions = [q or family.instructions[0] for q in questions]
        loss, count = family(pixels, instructions, targets)
        total += loss.item() * count.item()
        tokens += count.item()
    return total / max(tokens, 1)


def loss_only(family: nn.Module, samples: Sequence[Sample], config: Config, train: TrainConfig,
              batch_size: int) -> dict:
    """Loss and gradient L2 norms per batch in file order: no update, no shuffling, no augmentation.

    The family stays in training mode, as XrayGPT's ``forward`` was recorded for the fixture.
    """
    family.train()
    trainable = family.named_trainable()
    out = []
    for index, (pixels, targets, questions) in enumerate(_batches(family, samples, config, batch_size)):
        family.zero_grad(set_to_none=True)
        torch.manual_seed(train.seed)
        instructions = choose_instructions(questions, family.instructions, train.seed, index)
        loss, tokens = family(pixels, instructions, targets)
        loss.backward()
        norms = {name: p.grad.norm().item() for name, p in sorted(trainable.items()) if p.grad is not None}
        out.append({"loss": loss.item(), "grad_norms": norms, "target_tokens": int(tokens)})
    family.zero_grad(set_to_none=True)
    return {"batches": out}


def report_scores(family: nn.Module, samples: Sequence[Sample], config: Config, train: TrainConfig,
                  path: Path) -> dict | None:
    """``xraygpt evaluate --task report`` metrics on up to ``report_samples`` validation report rows."""
    rows = [s for s in samples if s.question is None][: train.report_samples]
    if not rows:
        return None
    family.eval()
    hypotheses = []
    for sample in rows:
        image = load_radiograph(sample.image, config.image).image
        hypotheses.append(family.generate_report(image, train.report_max_new_tokens))
    metrics = report_metrics(hypotheses, [s.target for s in rows])
    metrics["reports"] = [{"image": s.image.name, "generated": h, "reference": s.target}
                          for s, h in zip(rows, hypotheses, strict=True)]
    path.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    log.info("report metrics on %d validation rows: %s", len(rows), metrics["overall"])
    return metrics

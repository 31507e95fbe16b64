"""Numbers about a model being trained: validation loss, report metrics, and ``--loss-only`` batches."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import Config
from ..errors import MissingWeightsError
from ..evaluation.metrics import report_metrics
from ..imaging.loader import load_radiograph
from .config import TrainConfig
from .data import Sample

if TYPE_CHECKING:
    from .family import ChatTrainable, TrainableFamily

log = logging.getLogger(__name__)


def _batches(family: TrainableFamily, samples: Sequence[Sample], config: Config, batch_size: int):
    """File-order batches through the family's deterministic eval transform."""
    dataset = family.dataset(samples, False, config.image)
    for first in range(0, len(samples), batch_size):
        yield family.collate([dataset[(i, 0)] for i in range(first, min(first + batch_size, len(samples)))])


@torch.no_grad()
def validation_loss(family: TrainableFamily, samples: Sequence[Sample], config: Config,
                    train: TrainConfig) -> float | None:
    """Count-weighted mean loss over the validation rows (eval transform; chat families: the first instruction)."""
    if not samples:
        return None
    family.eval()
    total, counted = 0.0, 0
    for batch in _batches(family, samples, config, train.batch_size):
        loss, count = family(*family.eval_inputs(batch))
        total += loss.item() * count.item()
        counted += count.item()
    return total / max(counted, 1)


def loss_only(family: TrainableFamily, samples: Sequence[Sample], config: Config, train: TrainConfig,
              batch_size: int) -> dict:
    """Loss and gradient L2 norms per batch in file order: no update, no shuffling, no augmentation.

    The family is in the mode its reference was recorded in (``loss_only_mode``): XrayGPT's
    ``forward`` in training mode, the zero-shot models in evaluation mode (no dropout, BatchNorm
    running statistics).
    """
    family.train(family.loss_only_training_mode)
    trainable = family.named_trainable()
    out = []
    for index, batch in enumerate(_batches(family, samples, config, batch_size)):
        family.zero_grad(set_to_none=True)
        torch.manual_seed(train.seed)
        loss, count = family(*family.step_inputs(batch, train.seed, index))
        loss.backward()
        norms = {name: p.grad.norm().item() for name, p in sorted(trainable.items()) if p.grad is not None}
        out.append({"loss": loss.item(), "grad_norms": norms, family.count_name: int(count)})
    family.zero_grad(set_to_none=True)
    return {"batches": out}


def report_scores(family: ChatTrainable, samples: Sequence[Sample], config: Config, train: TrainConfig,
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
    chexbert = chexbert_scores(config, [s.target for s in rows], hypotheses)
    if chexbert is not None:
        metrics["chexbert"] = chexbert
    metrics["reports"] = [{"image": s.image.name, "generated": h, "reference": s.target}
                          for s, h in zip(rows, hypotheses, strict=True)]
    path.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    log.info("report metrics on %d validation rows: %s", len(rows), metrics["overall"])
    return metrics


def chexbert_scores(config: Config, references: list[str], hypotheses: list[str]) -> dict | None:
    """CheXbert F1 of the generated reports when the config names CheXbert's files and they are present.

    Absent files skip it with a warning: a finished training run is not failed over an extra metric.
    """
    spec = config.evaluation.chexbert
    if not (spec.weights.sources and spec.bert.sources):
        return None
    from ..evaluation.chexbert import CheXbertLabeler, chexbert_files
    from ..evaluation.clinical import chexbert_metrics

    try:
        labeler = CheXbertLabeler.from_files(*chexbert_files(config))
    except MissingWeightsError as exc:
        log.warning("CheXbert F1 skipped: %s", str(exc).splitlines()[0])
        return None
    classes = [labeler.label_classes(texts, spec.batch_size) for texts in (references, hypotheses)]
    return chexbert_metrics(*classes)

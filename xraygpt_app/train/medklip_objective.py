"""Fine-tuning MedKLIP with its classification loss, as ``PreTrain_MedKLIP`` computes it with ``no_cl=True``.

Rows ``{image, labels: {entity: 1 | 0 | -1 | 2}}``: every one of the 75 entities is a query (its
description through the frozen BERT, computed once as at inference); the network gives two logits
per (image, entity); the loss is ``F.cross_entropy`` over the pairs labelled 1 (present) or 0
(absent), their mean. -1 (not mentioned, also any entity a row leaves out) and 2 (uncertain) carry
no loss. The BERT and the entity queries stay fixed, as in MedKLIP's pre-training; the ResNet, its
projection, the query layer, the decoder and the classifier train.

Each epoch is written in MedKLIP's released format, ``{'model': state dict with DataParallel's
``module.`` prefix, 'config': the starting checkpoint's config, 'epoch'}``, which MedKLIP's code and
``classify`` (``--set zeroshot.models.NAME.weights=medklip_<epoch>.pth``) load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from ..config import Config
from ..imaging.loader import load_radiograph
from ..zeroshot.entities import ENTITIES
from .config import TrainConfig
from .data import DataError
from .outputs import save_atomically
from .zeroshot_data import LabelledRow
from .zeroshot_objectives import ZeroShotTrainable

log = logging.getLogger(__name__)

IGNORED_LABELS = (-1, 2)  # not mentioned, uncertain: no loss
IMAGE_SIZE = 224


def medklip_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of (B, E, 2) logits over the (image, entity) pairs labelled 1 or 0; (loss, their number)."""
    keep = (labels == 0) | (labels == 1)
    if not keep.any():
        raise DataError("a batch has no entity labelled 1 or 0: MedKLIP's loss is undefined for it")
    return nn.functional.cross_entropy(logits[keep], labels[keep]), keep.sum()


class MedKLIPTrainable(ZeroShotTrainable):
    """MedKLIP (ResNet-18 or -50) with its entity classification loss (see the module docstring)."""

    family = "medklip"
    loss_name = "MedKLIP entity cross-entropy"
    count_name = "labelled_pairs"  # (image, entity) pairs labelled 1 or 0: what the loss averages over

    def __init__(self, classifier, name: str, source: Path, settings: TrainConfig):
        super().__init__(classifier, name, source, settings)
        self.classifier = classifier
        queries = classifier.query_matrix({e: [t] for e, t in classifier.descriptions.items()})
        self.register_buffer("queries", queries.detach().float(), persistent=False)
        self.entity_index = {entity: i for i, entity in enumerate(classifier.descriptions)}

    @classmethod
    def from_config(cls, config: Config, settings: TrainConfig) -> MedKLIPTrainable:
        """MedKLIP through the classifier's own loading path; the network trains, BERT and queries stay fixed."""
        from ..zeroshot.medklip_classifier import MedKLIPClassifier, medklip_files

        classifier = MedKLIPClassifier.from_config(config, settings.model)
        family = cls(classifier, settings.model, medklip_files(config, settings.model)[0], settings)
        family.network.requires_grad_(True)
        return family

    @classmethod
    def check_row(cls, row: LabelledRow) -> None:
        if row.labels is None:
            raise DataError(f"{row.where}: MedKLIP trains on entity labels: {{\"image\": ..., \"labels\":"
                            f" {{entity: 1 | 0 | -1 | 2}}}}")
        unknown = sorted({name for name, _ in row.labels} - set(ENTITIES))
        if unknown:
            raise DataError(f"{row.where}: labels name entities MedKLIP does not have: {unknown}"
                            f" (its 75 entities: `xraygpt classify --model NAME --labels all` lists them)")

    def image_transform(self, augment: bool) -> Callable[[Image.Image], torch.Tensor]:
        """MedKLIP's test transform; with ``augment`` its pre-training crop and flip (without its RandAugment)."""
        from ..zeroshot.medklip import IMAGENET_MEAN, IMAGENET_STD, medklip_preprocess

        if not augment:
            return medklip_preprocess
        bicubic = transforms.InterpolationMode.BICUBIC
        train = transforms.Compose([
            transforms.RandomResizedCrop(IMAGE_SIZE, scale=(0.2, 1.0), interpolation=bicubic),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        return lambda image: train(image.convert("RGB"))

    def step_inputs(self, batch: tuple[torch.Tensor, list[LabelledRow]], seed: int, iteration: int) -> tuple:
        pixels, rows = batch
        labels = torch.full((len(rows), len(self.entity_index)), -1, dtype=torch.long)  # unnamed: not mentioned
        for i, row in enumerate(rows):
            for entity, value in row.labels:
                labels[i, self.entity_index[entity]] = value
        return pixels, labels

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the (image, entity) pairs labelled 1 or 0, their number)."""
        device = self.classifier.device
        logits = self.network(pixel_values.to(device), self.queries.to(device)).logits  # (B, E, 2)
        return medklip_loss(logits, labels.to(device))

    # --- checkpoints --------------------------------------------------------------------------------
    def save_epoch(self, output_dir: Path, epoch: int) -> Path:
        """``<name>_<epoch>.pth`` in MedKLIP's released layout."""
        from ..zeroshot.medklip import read_medklip_checkpoint

        _, released_config = read_medklip_checkpoint(self.source)
        state = {f"module.{k}": v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        path = output_dir / f"{self.name}_{epoch}.pth"
        save_atomically({"model": state, "config": released_config, "epoch": epoch}, path, None)
        return path

    # --- did it help? -------------------------------------------------------------------------------
    def truth(self, rows: Sequence[LabelledRow]) -> tuple[list[str], np.ndarray]:
        """Entities any row labels, in MedKLIP's order; 1 / 0, NaN for -1, 2 and unlabelled."""
        named = {entity for row in rows for entity, _ in row.labels}
        names = [entity for entity in self.entity_index if entity in named]
        table = np.full((len(rows), len(names)), np.nan)
        column = {entity: c for c, entity in enumerate(names)}
        for i, row in enumerate(rows):
            for entity, value in row.labels:
                if value in (0, 1):
                    table[i, column[entity]] = value
        return names, table

    @torch.no_grad()
    def scores(self, rows: Sequence[LabelledRow], names: Sequence[str], config: Config) -> np.ndarray:
        """(images, entities) log-odds from MedKLIP's classifier on this network."""
        self.eval()
        images = [load_radiograph(row.image, config.image).image for row in rows]
        return self.classifier.logits(images, self.classifier.prompt_set(labels=list(names))).float().numpy()

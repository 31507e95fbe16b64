"""Training rows for the zero-shot models: image-text pairs (with optional CheXpert labels) or entity labels.

A ``.jsonl`` file (one object per line) or a ``.csv`` file (``image``, ``text`` columns), image paths
relative to the file:

- ``{"image": ..., "text": ...}``: an image and its report sentence (MedCLIP, BiomedCLIP: the CLIP loss);
- plus ``"image_labels"`` and ``"text_labels"``: CheXpert's 14 findings of the image and of the
  sentence (1 positive, 0 uncertain, -1 negative), a list in MedCLIP's ``CHEXPERT_TASKS`` order or a
  ``{finding: value}`` mapping (findings left out count 0): MedCLIP's soft-label loss;
- ``{"image": ..., "labels": {entity: 1 | 0 | -1 | 2}}``: MedKLIP's entity labels (1 present, 0
  absent; -1 not mentioned and 2 uncertain carry no loss).

Every row is checked when read (its image through the radiograph loader); a bad row is an error
naming the file and line, or with ``skip_bad`` left out and counted.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import ImageConfig
from ..errors import XrayGPTError
from ..imaging.loader import load_radiograph, model_ready
from .data import DataError, DataSummary, collect_rows

log = logging.getLogger(__name__)

# MedCLIP's medclip.constants.CHEXPERT_TASKS: the column order of its label vectors.
CHEXPERT_TASKS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity",
                  "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                  "Pleural Other", "Fracture", "Support Devices")
CHEXPERT_VALUES = (1.0, 0.0, -1.0)
ENTITY_VALUES = (1, 0, -1, 2)


@dataclass(frozen=True)
class LabelledRow:
    """One training row of a zero-shot model; ``where`` names its file and line for messages."""

    image: Path
    where: str
    text: str | None = None
    image_labels: tuple[float, ...] | None = None  # 14 values in CHEXPERT_TASKS order
    text_labels: tuple[float, ...] | None = None
    labels: tuple[tuple[str, int], ...] | None = None  # MedKLIP: (entity, value) pairs


def read_rows(path: str | Path, skip_bad: bool, limits: ImageConfig | None,
              check: Callable[[LabelledRow], None]) -> DataSummary:
    """Every usable row of a ``.jsonl`` / ``.csv`` file; ``check`` raises DataError for rows the model cannot use."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Training data not found: {path}" if not path.exists() else
                        f"{path}: the zero-shot models read a .jsonl or .csv file of rows, not a folder")
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise DataError(f"{path}: expected a .jsonl or .csv file")
    raw = _jsonl(path) if path.suffix.lower() == ".jsonl" else _csv(path)
    return collect_rows(path, (functools.partial(_checked_row, path, where, item, limits, check)
                               for where, item in raw), skip_bad)


def _checked_row(path: Path, where: str, item: object, limits: ImageConfig | None,
                 check: Callable[[LabelledRow], None]) -> LabelledRow:
    row = parse_row(path, where, item)
    check(row)
    _check_image(row, limits)
    return row


def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}: line {number}", json.loads(line)
            except ValueError as exc:
                yield f"{path}: line {number}", DataError(f"{path}: line {number}: not JSON ({exc})")


def _csv(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):  # row 1 is the header
            yield f"{path}: row {number}", row


def parse_row(path: Path, where: str, item: object) -> LabelledRow:
    """One row's fields, typed and range-checked (what a model needs is checked by the model)."""
    if isinstance(item, DataError):
        raise item
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with image and text (or labels)")
    image = item.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: needs an image path")
    text = item.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise DataError(f"{where}: text must be a non-empty string")
    has = ("image_labels" in item, "text_labels" in item)
    if any(has) and not all(has):
        raise DataError(f"{where}: give both image_labels and text_labels (MedCLIP's soft-label loss), or neither")
    image_labels = _chexpert(where, "image_labels", item["image_labels"]) if all(has) else None
    text_labels = _chexpert(where, "text_labels", item["text_labels"]) if all(has) else None
    labels = _entities(where, item["labels"]) if item.get("labels") is not None else None
    return LabelledRow((path.parent / image.strip()).resolve(), where, text, image_labels, text_labels, labels)


def _chexpert(where: str, name: str, value: object) -> tuple[float, ...]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(CHEXPERT_TASKS))
        if unknown:
            raise DataError(f"{where}: {name}: unknown findings {unknown} (CheXpert's 14: {', '.join(CHEXPERT_TASKS)})")
        value = [value.get(task, 0) for task in CHEXPERT_TASKS]
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(CHEXPERT_TASKS):
        raise DataError(f"{where}: {name} must be {len(CHEXPERT_TASKS)} values in CHEXPERT_TASKS order"
                        f" or a {{finding: value}} mapping")
    if any(isinstance(v, bool) or not isinstance(v, int | float) or float(v) not in CHEXPERT_VALUES for v in value):
        raise DataError(f"{where}: {name} values must be 1 (positive), 0 (uncertain) or -1 (negative)")
    return tuple(float(v) for v in value)


def _entities(where: str, value: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, Mapping) or not value:
        raise DataError(f"{where}: labels must be a non-empty {{entity: 1 | 0 | -1 | 2}} mapping")
    if any(isinstance(v, bool) or v not in ENTITY_VALUES for v in value.values()):
        raise DataError(f"{where}: labels values must be 1 (present), 0 (absent), -1 (not mentioned) or 2 (uncertain)")
    return tuple((str(k), int(v)) for k, v in value.items())


def _check_image(row: LabelledRow, limits: ImageConfig | None) -> None:
    if not row.image.is_file():
        raise DataError(f"{row.where}: image not found: {row.image}")
    try:
        load_radiograph(row.image, limits)
    except XrayGPTError as exc:
        raise DataError(f"{row.where}: image {row.image.name} cannot be used: {exc}") from None


class RowDataset(Dataset):
    """Rows -> (pixel values, row); items are ``(index, seed)`` pairs, as in the chat families' dataset."""

    def __init__(self, rows: Sequence[LabelledRow], transform: Callable[[Image.Image], torch.Tensor],
                 limits: ImageConfig | None = None):
        self.rows, self.transform, self.limits = list(rows), transform, limits

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, LabelledRow]:
        index, seed = item
        row = self.rows[index]
        image = model_ready(load_radiograph(row.image, self.limits).image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels = self.transform(image)
        return pixels, row


def collate_rows(items: list[tuple[torch.Tensor, LabelledRow]]) -> tuple[torch.Tensor, list[LabelledRow]]:
    pixels, rows = zip(*items, strict=True)
    return torch.stack(pixels), list(rows)

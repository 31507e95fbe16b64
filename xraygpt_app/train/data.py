"""Training data: read image–text pairs, check every row, split, and turn images into tensors.

Two layouts:

- XrayGPT / MiniGPT-4 stage 2: a folder with ``filter_cap.json``
  (``{"annotations": [{"image_id": ..., "caption": ...}]}``) and the images in ``image/`` (XrayGPT's
  ``vis_root``) or beside the JSON. XrayGPT opens ``<image_id>.png``; we take any file named
  ``<image_id>.<ext>`` that the radiograph loader reads (PNG, JPEG, DICOM...).
- A ``.jsonl`` or ``.csv`` file with ``image`` (a path relative to the file), ``answer`` (or
  ``caption``) and an optional ``question``: a VQA row, whose question becomes the instruction.

A row that cannot be used is an error naming the file and the row; with ``skip_bad`` it is left
out and counted in the summary. Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import ImageConfig
from ..errors import BadInputError, XrayGPTError
from ..imaging.loader import load_radiograph, model_ready

log = logging.getLogger(__name__)

CAPTION_FILE = "filter_cap.json"
TARGET_COLUMNS = ("answer", "caption")


class DataError(BadInputError):
    """A training data file or row cannot be used; the message names the file and the row."""


@dataclass(frozen=True)
class Sample:
    """One training pair; ``where`` names its file and row for messages."""

    image: Path
    target: str
    question: str | None
    where: str


@dataclass
class DataSummary:
    """What was read: usable samples, and every row left out with the reason."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{len(self.samples)} usable rows, {len(self.skipped)} skipped"


def read_samples(path: str | Path, skip_bad: bool = False, check_images: bool = True,
                 limits: ImageConfig | None = None) -> DataSummary:
    """Every usable row of a data folder or file, each image checked by the radiograph loader."""
    path = Path(path)
    if path.is_dir() or path.name == CAPTION_FILE:
        rows = _caption_rows(path if path.is_file() else path / CAPTION_FILE)
    elif path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    elif not path.exists():
        raise DataError(f"Training data not found: {path}")
    else:
        raise DataError(f"{path}: expected a folder with {CAPTION_FILE}, a .jsonl or a .csv file")
    return collect_rows(path, (functools.partial(_checked, row, check_images, limits) for row in rows), skip_bad)


def collect_rows(path: Path, checks: Iterable[Callable[[], object]], skip_bad: bool) -> DataSummary:
    """Run each row's check (it returns the row, or raises DataError): a bad row stops the read, or with
    ``skip_bad`` is left out and counted; no usable row at all is an error."""
    summary = DataSummary()
    for check in checks:
        try:
            summary.samples.append(check())
        except DataError as exc:
            if not skip_bad:
                raise DataError(f"{exc} (use --skip-bad to leave such rows out)") from None
            summary.skipped.append(str(exc))
            log.warning("skipped: %s", exc)
    if not summary.samples:
        raise DataError(f"{path}: no usable rows ({summary.describe()})")
    return summary


def _checked(row: Sample | DataError, check_images: bool, limits: ImageConfig | None) -> Sample:
    if isinstance(row, DataError):
        raise row
    if not row.target.strip():
        raise DataError(f"{row.where}: the answer/caption is empty")
    if not row.image.is_file():
        raise DataError(f"{row.where}: image not found: {row.image}")
    if check_images:
        try:
            load_radiograph(row.image, limits)
        except XrayGPTError as exc:
            raise DataError(f"{row.where}: image {row.image.name} cannot be used: {exc}") from None
    return row


def _caption_rows(path: Path) -> Iterator[Sample | DataError]:
    """MiniGPT-4 stage-2 ``filter_cap.json``; images in ``image/`` or beside the file."""
    if not path.is_file():
        raise DataError(f"{path.parent}: no {CAPTION_FILE} in this folder")
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: expected {{\"annotations\": [{{\"image_id\", \"caption\"}}]}} ({exc})") from None
    images = _image_index(path.parent / "image" if (path.parent / "image").is_dir() else path.parent)
    for i, item in enumerate(annotations):
        where = f"{path}: annotation {i}"
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), str):
            yield DataError(f"{where}: needs image_id and a caption string")
            continue
        image_id = str(item["image_id"])
        found = images.get(image_id)
        if found is None:
            yield DataError(f"{where}: no image named {image_id}.<ext> in {path.parent}")
            continue
        yield Sample(found, item["caption"], None, where)


def _image_index(folder: Path) -> dict[str, Path]:
    """Image id -> file: ``<id>.png`` first (XrayGPT's name), else any ``<id>.<ext>``."""
    index: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix.lower() != ".json":
            if file.stem not in index or file.suffix.lower() == ".png":
                index[file.stem] = file
    return index


def _jsonl_rows(path: Path) -> Iterator[Sample | DataError]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            yield DataError(f"{path}: line {number}: not JSON ({exc})")
            continue
        yield _table_row(path, f"{path}: line {number}", row)


def _csv_rows(path: Path) -> Iterator[Sample | DataError]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):  # row 1 is the header
            yield _table_row(path, f"{path}: row {number}", row)


def _table_row(path: Path, where: str, row: object) -> Sample | DataError:
    if not isinstance(row, dict):
        return DataError(f"{where}: expected an object with image and answer")
    target = next((row[c] for c in TARGET_COLUMNS if row.get(c) is not None), None)
    image = row.get("image")
    if not isinstance(image, str) or not image.strip() or not isinstance(target, str):
        return DataError(f"{where}: needs an image path and an answer (or caption) text")
    question = row.get("question")
    if question is not None and not isinstance(question, str):
        return DataError(f"{where}: the question must be text")
    # An empty question cell is a report row (a CSV mixing both kinds has one for every row).
    return Sample((path.parent / image.strip()).resolve(), target, (question or "").strip() or None, where)


def split_samples(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded train/validation split (at least one of each when there are two or more rows)."""
    if val_fraction <= 0 or len(samples) < 2:
        return list(samples), []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(samples) - 1, max(1, round(len(samples) * val_fraction)))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [samples[i] for i in train], [samples[i] for i in val]


class PairDataset(Dataset):
    """Samples -> (pixel values, target, question); items are ``(index, seed)`` pairs.

    The seed makes the random crop a function of the sample's place in the run, not of the
    process or worker that loads it, so a resumed run and a multi-process run see the same crops.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor],
                 limits: ImageConfig | None = None):
        self.samples, self.transform, self.limits = list(samples), transform, limits

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, str, str | None]:
        index, seed = item
        sample = self.samples[index]
        image = model_ready(load_radiograph(sample.image, self.limits).image).convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels = self.transform(image)
        return pixels, sample.target, sample.question


def collate(batch: list[tuple[torch.Tensor, str, str | None]]) -> tuple[torch.Tensor, list[str], list[str | None]]:
    """Stack the images; keep texts as lists."""
    pixels, targets, questions = zip(*batch, strict=True)
    return torch.stack(pixels), list(targets), list(questions)

"""Training data: both layouts, DICOM included, bad rows named or skipped and counted, split, transforms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import traindata

from xraygpt_app.config import VisionConfig
from xraygpt_app.train.data import DataError, PairDataset, read_samples, split_samples
from xraygpt_app.train.xraygpt_objective import image_transform

PNG = "nih_cxr14_00000001_000_pa_512.png"
DICOM = "dx_nih_chest_mono2_8bit_implicit_vr.dcm"
JPEG = "covidcxr_2168a917_pa_2000.jpg"


def caption_folder(root: Path, samples_dir: Path, extra: list[dict] | None = None) -> Path:
    """Two rows: a PNG and a DICOM (``img0.png``, ``img1.dcm``)."""
    return traindata.caption_folder(root, samples_dir, [PNG, DICOM], extra)


def test_caption_folder_reads_png_and_dicom(tmp_path: Path, samples_dir: Path) -> None:
    summary = read_samples(caption_folder(tmp_path / "d", samples_dir))
    assert [s.image.name for s in summary.samples] == ["img0.png", "img1.dcm"]
    assert [s.question for s in summary.samples] == [None, None]
    assert summary.skipped == []


def test_jsonl_and_csv_rows(tmp_path: Path, samples_dir: Path) -> None:
    shutil.copy(samples_dir / JPEG, tmp_path / "c.jpg")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"image": "c.jpg", "answer": "Yes.", "question": "Any opacity?"}) + "\n\n"
        + json.dumps({"image": "c.jpg", "caption": "Report text."}) + "\n", encoding="utf-8")
    rows = read_samples(tmp_path / "d.jsonl").samples
    assert [(r.target, r.question) for r in rows] == [("Yes.", "Any opacity?"), ("Report text.", None)]
    (tmp_path / "d.csv").write_text("image,answer,question\nc.jpg,Yes.,Any opacity?\nc.jpg,Report.,\n",
                                    encoding="utf-8")
    rows = read_samples(tmp_path / "d.csv").samples
    assert [(r.target, r.question) for r in rows] == [("Yes.", "Any opacity?"), ("Report.", None)]


@pytest.mark.parametrize(("row", "message"), [
    ({"image_id": "missing", "caption": "x"}, "annotation 2: no image named missing"),
    ({"image_id": "bad", "caption": "x"}, "annotation 2: image bad.png cannot be used"),
    ({"image_id": "img0", "caption": "  "}, "annotation 2: the answer/caption is empty"),
])
def test_bad_row_names_file_and_row(tmp_path: Path, samples_dir: Path, row: dict, message: str) -> None:
    folder = caption_folder(tmp_path / "d", samples_dir, [row])
    (folder / "image" / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=message) as info:
        read_samples(folder)
    assert "filter_cap.json" in str(info.value) and "--skip-bad" in str(info.value)
    summary = read_samples(folder, skip_bad=True)
    assert len(summary.samples) == 2 and len(summary.skipped) == 1 and message in summary.skipped[0]


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"image": "x.png", "answer": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl: line 1: image not found"):
        read_samples(tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"no usable rows \(0 usable rows, 2 skipped\)"):
        read_samples(tmp_path / "d.jsonl", skip_bad=True)


def test_split_is_seeded_and_disjoint(tmp_path: Path, samples_dir: Path) -> None:
    samples = read_samples(caption_folder(tmp_path / "d", samples_dir), check_images=False).samples * 5
    train, val = split_samples(samples, 0.2, seed=3)
    assert (len(train), len(val)) == (8, 2)
    assert split_samples(samples, 0.2, seed=3) == (train, val)


def test_train_transform_is_a_seeded_random_crop(tmp_path: Path, samples_dir: Path) -> None:
    samples = read_samples(caption_folder(tmp_path / "d", samples_dir)).samples
    vision = VisionConfig(image_size=56)
    augmented = PairDataset(samples, image_transform(vision, augment=True))
    plain = PairDataset(samples, image_transform(vision, augment=False))
    first, second = augmented[(0, 1)][0], augmented[(0, 2)][0]
    assert first.shape == (3, 56, 56) and not torch.equal(first, second)
    assert torch.equal(first, augmented[(0, 1)][0])  # same seed, same crop
    assert torch.equal(plain[(0, 1)][0], plain[(0, 2)][0])

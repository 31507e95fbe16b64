"""Small training-data folders built from ``../shared/xray-samples`` inside the tests (never in the repo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PNG = "nih_cxr14_00000001_000_pa_512.png"
CAPTIONS = {  # image file in xray-samples -> a report-like caption
    "nih_cxr14_00000001_000_pa_512.png": "The heart is normal in size. The lungs are clear.",
    "hannover_1479fa94_pa_640x755.png": "There is a moderate right pleural effusion.",
    "dx_nih_chest_mono2_8bit_implicit_vr.dcm": "No acute cardiopulmonary abnormality.",
    "covidcxr_2168a917_pa_2000.jpg": "Bilateral patchy opacities in the lower lobes.",
}


def caption_folder(root: Path, samples_dir: Path, names: list[str] | None = None, extra: list[dict] | None = None
                   ) -> Path:
    """XrayGPT's stage-2 layout: ``filter_cap.json`` and ``image/<id>.<ext>`` (PNG, JPEG and DICOM)."""
    (root / "image").mkdir(parents=True)
    annotations = []
    for i, name in enumerate(names or list(CAPTIONS)):
        image_id = f"img{i}"
        shutil.copy(samples_dir / name, root / "image" / f"{image_id}{Path(name).suffix}")
        annotations.append({"image_id": image_id, "caption": CAPTIONS[name]})
    annotations += extra or []
    (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}), encoding="utf-8")
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path

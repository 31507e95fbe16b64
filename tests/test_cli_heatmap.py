"""``--heatmap`` of ``classify`` and ``report``: PNGs written, scores and tokens unchanged, bad requests exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from xraygpt_app.cli import main


@pytest.fixture
def tiny(tiny_config: Path) -> str:
    return str(tiny_config)


@pytest.fixture
def image(samples_dir: Path) -> str:
    return str(samples_dir / "hannover_00870a9c_ap_bedside_640x524.png")


@pytest.fixture
def dicom(samples_dir: Path) -> str:
    return str(samples_dir / "dx_nih_chest_mono2_8bit_implicit_vr.dcm")


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_classify_heatmaps_one_png_per_image_and_label(tmp_path, capsys, tiny, image, dicom):
    assert main(["classify", image, dicom, "-c", tiny, "--json"]) == 0
    plain = _json(capsys)
    out = tmp_path / "maps"
    assert main(["classify", image, dicom, "-c", tiny, "--json", "--heatmap", str(out)]) == 0
    mapped = _json(capsys)
    assert mapped["results"] == plain["results"]  # maps change no score
    labels = plain["results"][0]["labels"]
    assert len(mapped["heatmaps"]) == 2 * len(labels)
    assert "not a diagnosis" in mapped["heatmap_meaning"]
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(p).name for p in mapped["heatmaps"])
    assert (out / "hannover_00870a9c_ap_bedside_640x524_pleural-effusion.png").is_file()
    assert Image.open(mapped["heatmaps"][0]).format == "PNG"


def test_report_heatmap_with_a_span(tmp_path, capsys, tiny, image):
    assert main(["report", image, "-c", tiny, "--greedy", "--max-new-tokens", "8", "--json"]) == 0
    plain = _json(capsys)
    word = plain["turns"][0]["answer"].split()[0]
    out = tmp_path / "report"
    assert main(["report", image, "-c", tiny, "--greedy", "--max-new-tokens", "8", "--json", "--heatmap", str(out),
                 "--span", word]) == 0
    mapped = _json(capsys)
    assert mapped["turns"][0]["token_ids"] == plain["turns"][0]["token_ids"]
    (written,) = mapped["heatmaps"]
    assert Path(written).name.startswith("hannover_00870a9c_ap_bedside_640x524_turn1_")
    assert Path(written).is_file()


def test_heatmap_requests_that_cannot_work_exit_2(tmp_path, capsys, tiny, image):
    assert main(["report", image, "-c", tiny, "--span", "effusion"]) == 2
    assert "--span needs --heatmap" in capsys.readouterr().err
    assert main(["report", image, "-c", tiny, "--greedy", "--max-new-tokens", "4", "--heatmap", str(tmp_path),
                 "--span", "zzzz not in the answer"]) == 2
    assert "does not occur" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["classify", image, "-c", tiny, "--heatmap", str(blocker / "sub")]) == 2

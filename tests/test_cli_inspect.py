"""``xraygpt inspect``: per-file report, exit codes, JSON, previews, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, SAMPLES, sample_rows
from PIL import Image

from xraygpt_app.cli import main
from xraygpt_app.imaging.loader import load_radiograph

pytestmark = pytest.mark.usefixtures("samples_dir")  # every test reads ../shared/xray-samples: skip without it
SAMPLE_FILES = [str(SAMPLES / row["filename"]) for row in sample_rows()]
SMALL = [str(SAMPLES / name) for name in ("nih_cxr14_00000001_000_pa_512.png",
                                          "dx_canine_thorax_lateral_mono1_8bit_explicit_vr.dcm")]


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, str]:
    """A few files that must each fail with their own message."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "note.jpg").write_text("Findings: none. Impression: normal.\n")
    (tmp_path / "paper.png").write_bytes(b"%PDF-1.4\n%%EOF\n")
    png = (SAMPLES / "nih_cxr14_00000001_000_pa_512.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "folder").mkdir()
    dicom = (SAMPLES / "cr_siim_chest_pa_mono2_jpeg_baseline.dcm").read_bytes()
    soi = dicom.find(b"\xff\xd8\xff", dicom.rfind(b"\xe0\x7f\x10\x00"))
    (tmp_path / "broken.dcm").write_bytes(dicom[:soi] + b"\x00\x00" + dicom[soi + 2:])
    (tmp_path / "cut.dcm").write_bytes(dicom[: len(dicom) // 2])
    return {
        str(tmp_path / "broken.dcm"): "damaged",
        str(tmp_path / "cut.dcm"): "truncated",
        str(tmp_path / "empty.png"): "empty",
        str(tmp_path / "note.jpg"): "plain text",
        str(tmp_path / "paper.png"): "PDF",
        str(tmp_path / "cut.png"): "truncated",
        str(tmp_path / "folder"): "folder",
        str(tmp_path / "absent.dcm"): "No such file",
    }


def test_all_samples_load(capsys):
    assert SAMPLE_FILES, "no samples found in ../shared/xray-samples"
    assert main(["inspect", *SAMPLE_FILES]) == 0
    out = capsys.readouterr().out
    assert out.count("\nOK ") + out.startswith("OK ") == len(SAMPLE_FILES)
    assert f"{len(SAMPLE_FILES)} of {len(SAMPLE_FILES)} file(s) loaded" in out
    assert "DICOM 1841x1955, 15-bit MONOCHROME1, CR PA CHEST (JPEG 2000 Image Compression)" in out


def test_bad_files_fail_with_their_own_message_and_exit_2(capsys, bad_files):
    assert main(["inspect", SMALL[0], *bad_files]) == 2
    captured = capsys.readouterr()
    blocks = captured.out.split("\n")
    for name, message in bad_files.items():
        line = blocks.index(f"FAIL  {name}")
        assert message in blocks[line + 1], (name, blocks[line + 1])
    assert f"1 of {len(bad_files) + 1} file(s) loaded" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_json_output(capsys, bad_files):
    empty = next(name for name in bad_files if name.endswith("empty.png"))
    assert main(["inspect", "--json", *SMALL, empty]) == 2
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == [*SMALL, empty]
    assert [r["ok"] for r in results] == [True, True, False]
    assert results[1]["info"]["modality"] == "DX" and results[1]["info"]["photometric"] == "MONOCHROME1"
    assert results[0]["info"]["width"] == 512 and "empty" in results[2]["error"]


def test_save_preview_writes_what_the_model_sees(tmp_path, capsys):
    out_dir = tmp_path / "previews"
    assert main(["inspect", "--save-preview", str(out_dir), *SMALL, SMALL[0]]) == 0
    written = sorted(out_dir.iterdir())
    assert len(written) == 3  # the repeated file gets its own name, nothing overwritten
    for source in SMALL:
        preview = out_dir / f"{Path(source).name}.png"
        with Image.open(preview) as image:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(load_radiograph(source).image))
    assert "preview:" in capsys.readouterr().out


def test_config_overrides_set_the_limits(capsys):
    assert main(["inspect", "--set", "image.min_side=600", *SMALL]) == 2
    out = capsys.readouterr().out
    assert "512x512" in out and "211x169" in out and "0 of 2" in out


def test_command_line_never_shows_a_traceback(bad_files):
    result = subprocess.run([sys.executable, "-m", "xraygpt_app.cli", "inspect", *bad_files],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "pydicom" not in result.stderr and "libjpeg" not in result.stderr  # decoder failures are not logged
    assert result.stdout.count("FAIL  ") == len(bad_files)


def test_unwritable_preview_folder_is_reported(tmp_path, capsys):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    assert main(["inspect", "--save-preview", str(not_a_folder), SMALL[0]]) == 2
    assert "preview could not be written" in capsys.readouterr().out

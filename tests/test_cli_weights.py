"""``xraygpt fetch`` / ``xraygpt check``: exit codes and messages, no network (a 127.0.0.1 server)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from helpers import SHARED, TINY_CONFIG

from xraygpt_app.cli import main

FIXTURE = SHARED / "fixtures" / "xraygpt_tiny"  # tests that read it take the xraygpt_fixture_dir fixture
MANUAL_HOW_TO = "Download it by hand from the XrayGPT README into checkpoints/"


def _config(tmp_path: Path, weights: dict) -> Path:
    """A config with the tiny fixture's architecture and the given weights section."""
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["weights"].update(weights)
    raw.pop("zeroshot", None)  # its relative paths would not resolve from tmp_path
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _absolute_fixture_weights() -> dict:
    return {name: str(FIXTURE / file) for name, file in (
        ("ckpt", "xraygpt_tiny.pth"), ("llama_model", "vicuna_tiny"),
        ("eva_vit_g", "eva_vit_tiny.pth"), ("blip2_qformer", "blip2_tiny.pth"))}


@pytest.mark.usefixtures("xraygpt_fixture_dir")  # reads ../shared/fixtures/xraygpt_tiny
def test_check_all_present(capsys):
    assert main(["check", "--config", str(TINY_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "(valid)" in out and "MISSING" not in out
    for file in ("xraygpt_tiny.pth", "vicuna_tiny", "eva_vit_tiny.pth", "blip2_tiny.pth"):
        assert str((FIXTURE / file).resolve()) in out
    assert "cpu: " in out and "GiB" in out  # the estimate for this machine (fp32 on the CPU)


@pytest.mark.usefixtures("xraygpt_fixture_dir")  # reads ../shared/fixtures/xraygpt_tiny
def test_check_missing_file_exit_3_with_message(tmp_path, capsys):
    absent = tmp_path / "checkpoints" / "xraygpt_pretrained.pth"
    config = _config(tmp_path, {**_absolute_fixture_weights(),
                                "ckpt": {"sources": [str(absent)], "how_to_get": MANUAL_HOW_TO}})
    assert main(["check", "--config", str(config)]) == 3
    captured = capsys.readouterr()
    assert "MISSING  weights.ckpt" in captured.out and str(absent) in captured.out
    assert MANUAL_HOW_TO in captured.out
    assert captured.out.count("present  ") == 3
    assert "1 weights entry is missing" in captured.err


@pytest.mark.usefixtures("xraygpt_fixture_dir")  # reads ../shared/fixtures/xraygpt_tiny
def test_check_json_and_set_override(tmp_path, capsys):
    absent = tmp_path / "nothing_here.pth"
    code = main(["check", "-c", str(TINY_CONFIG), "--set", f"weights.eva_vit_g={absent}", "--json"])
    assert code == 3
    report = json.loads(capsys.readouterr().out)
    by_name = {entry["name"]: entry for entry in report["weights"]}
    assert by_name["weights.eva_vit_g"]["present"] is False and by_name["weights.eva_vit_g"]["path"] is None
    assert str(absent) in by_name["weights.eva_vit_g"]["message"]
    assert by_name["weights.ckpt"]["path"] == str((FIXTURE / "xraygpt_tiny.pth").resolve())
    assert report["valid"] is True and report["memory_bytes"]["cpu"] > 0


def test_check_bad_config_exit_2(tmp_path, capsys):
    assert main(["check", "-c", str(TINY_CONFIG), "--set", "weights.ckpts=/x.pth"]) == 2
    assert "unknown key weights.ckpts" in capsys.readouterr().err
    assert main(["check", "-c", str(tmp_path / "no_such.yaml")]) == 2


@pytest.mark.usefixtures("xraygpt_fixture_dir")  # reads ../shared/fixtures/xraygpt_tiny
def test_fetch_downloads_url_and_explains_manual(server, tmp_path, capsys):
    base, root = server
    data = (FIXTURE / "eva_vit_tiny.pth").read_bytes()
    (root / "eva_vit_tiny.pth").write_bytes(data)
    cache = tmp_path / "cache"
    weights = {**_absolute_fixture_weights(),
               "eva_vit_g": {"sources": [str(tmp_path / "absent.pth"), f"{base}/eva_vit_tiny.pth"],
                             "sha256": hashlib.sha256(data).hexdigest()},
               "ckpt": {"sources": [str(tmp_path / "xraygpt_pretrained.pth")], "how_to_get": MANUAL_HOW_TO},
               "cache_dir": str(cache)}
    config = _config(tmp_path, weights)
    assert main(["fetch", "--config", str(config)]) == 3  # the manual checkpoint is still missing
    out = capsys.readouterr().out
    assert "downloaded  weights.eva_vit_g" in out and str(cache) in out
    assert "manual      weights.ckpt" in out and MANUAL_HOW_TO in out
    assert "present     weights.blip2_qformer" in out

    (tmp_path / "xraygpt_pretrained.pth").write_bytes(b"stand-in checkpoint")
    assert main(["fetch", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "present     weights.eva_vit_g" in out and "downloaded" not in out


def test_fetch_reports_failed_download(server, tmp_path, capsys):
    base, _ = server
    config = _config(tmp_path, {**_absolute_fixture_weights(),
                                "blip2_qformer": {"sources": [f"{base}/gone.pth"], "how_to_get": "see README"},
                                "cache_dir": str(tmp_path / "cache")})
    assert main(["fetch", "-c", str(config)]) == 3
    out = capsys.readouterr().out
    assert "failed      weights.blip2_qformer" in out and "download failed: HTTPError" in out
    assert "see README" in out

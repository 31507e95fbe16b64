"""A newcomer's first ``xraygpt serve``: the public weights are fetched (size, licence, progress),
zero-shot then works, and an offline start still serves with a plain message and the commands to run.

No network: URLs are served by an http.server on 127.0.0.1, the Hub by a cache folder laid out as
huggingface_hub lays it out (HF_HUB_OFFLINE on), as in test_weights.py.
"""

from __future__ import annotations

import json
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml
from _app_server import running_app
from helpers import SHARED, TINY_CONFIG
from test_weights import _put_in_hub_cache, hf_cache  # noqa: F401  (hf_cache: the offline Hub cache fixture)

from xraygpt_app.cli.serve import fetch_on_start
from xraygpt_app.config import load_config
from xraygpt_app.weights import human_size

FIXTURE = SHARED / "fixtures" / "xraygpt_tiny"  # tests that read it take a fixture of ../shared
MEDCLIP = SHARED / "fixtures" / "medclip_tiny"
LICENCE = "MIT (MedCLIP's repository, which links it)"
pytestmark = pytest.mark.timeout(600)


def released_zip(folder: Path) -> bytes:
    """The tiny MedCLIP in the layout of the released medclip-vit-pretrained.zip."""
    path = folder / "medclip-vit-pretrained.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(MEDCLIP / "medclip_vit_tiny" / "pytorch_model.bin", "medclip-vit-pretrained/pytorch_model.bin")
    return path.read_bytes()


def first_run_config(tmp_path: Path, base: str, extra: dict | None = None) -> Path:
    """The tiny models where a newcomer has none: the public files behind URLs, XrayGPT's checkpoint absent."""
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["weights"] = {
        "ckpt": {"sources": [str(tmp_path / "checkpoints" / "xraygpt_pretrained.pth")],
                 "how_to_get": "a manual download (XrayGPT's README)"},
        "llama_model": str(FIXTURE / "vicuna_tiny"), "blip2_qformer": str(FIXTURE / "blip2_tiny.pth"),
        "eva_vit_g": {"sources": [str(tmp_path / "checkpoints" / "eva_vit_g.pth"), f"{base}/eva_vit_tiny.pth"],
                      "licence": "BSD-3-Clause (LAVIS, which publishes it)"},
        "cache_dir": str(tmp_path / "cache"), **(extra or {})}
    raw["zeroshot"]["models"] = {"medclip-vit": {
        "kind": "medclip-vit", "vision_config": str(MEDCLIP / "swin_tiny"), "text_config": str(MEDCLIP / "bert_tiny"),
        "weights": {"sources": [str(tmp_path / "checkpoints" / "medclip-vit-pretrained.zip"),
                                f"{base}/medclip-vit-pretrained.zip"], "licence": LICENCE}}}
    path = tmp_path / "first-run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_first_start_fetches_public_weights_and_zero_shot_works(server, tmp_path, capsys, samples_dir):  # noqa: F811
    from xraygpt_app.imaging.loader import load_radiograph
    from xraygpt_app.web.services import build_services

    base, root = server
    size = len(released_zip(root))
    (root / "eva_vit_tiny.pth").write_bytes((FIXTURE / "eva_vit_tiny.pth").read_bytes())
    config = load_config(first_run_config(tmp_path, base))
    assert fetch_on_start(config, offline=False) == 1  # only XrayGPT's manual checkpoint is left
    out = capsys.readouterr().out
    assert (f"downloading zeroshot.models.medclip-vit.weights: {human_size(size)} from "
            f"{base}/medclip-vit-pretrained.zip (licence: {LICENCE})") in out
    assert out.index("zeroshot.models.medclip-vit") < out.index("weights.eva_vit_g")  # the small, useful ones first
    assert "downloaded  weights.eva_vit_g" in out and "BSD-3-Clause" in out
    assert f"Save them as: {tmp_path / 'checkpoints' / 'xraygpt_pretrained.pth'}\n" in out

    services = build_services(config)
    assert "Save them as" in services.assistant_missing and services.assistant is None
    image = load_radiograph(samples_dir / "nih_cxr14_00000001_000_pa_512.png").image
    result = services.classifier("medclip-vit").classify([image], preset="covid")[0]
    assert result.labels == ["Normal", "COVID"]  # zero-shot works out of the box

    assert fetch_on_start(config, offline=False) == 1  # a second start downloads nothing again
    assert "downloading" not in capsys.readouterr().out


@pytest.mark.usefixtures("xraygpt_fixture_dir")  # reads ../shared/fixtures/xraygpt_tiny
def test_unreachable_sources_and_offline_download_nothing_and_say_so(tmp_path, capsys):
    config = load_config(first_run_config(tmp_path, "http://127.0.0.1:9"))  # port 9: nothing listens
    assert fetch_on_start(config, offline=False) == 3
    out = capsys.readouterr().out
    assert "size unknown" in out and "failed      zeroshot.models.medclip-vit.weights" in out
    assert f"Save them as: {tmp_path / 'checkpoints' / 'eva_vit_g.pth'}\n" in out  # one local place
    assert "download failed: URLError" in out and "still missing" in out
    assert fetch_on_start(config, offline=True) == 0
    out = capsys.readouterr().out
    assert out.startswith("Offline: nothing is downloaded") and "downloading" not in out
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]  # no half-written files


@pytest.mark.usefixtures("xraygpt_fixture_dir")  # reads ../shared/fixtures/xraygpt_tiny
def test_hub_files_from_the_cache_and_an_offline_hub(hf_cache, tmp_path, capsys):  # noqa: F811
    _put_in_hub_cache(hf_cache, "lavis/blip2", {"blip2_tiny.pth": (FIXTURE / "blip2_tiny.pth").read_bytes()})
    extra = {"blip2_qformer": "hf-hub:lavis/blip2/blip2_tiny.pth", "eva_vit_g": "hf-hub:lavis/eva/eva_vit_tiny.pth"}
    config = load_config(first_run_config(tmp_path, "http://127.0.0.1:9", extra))
    fetch_on_start(config, offline=False)
    out = capsys.readouterr().out
    assert "present     weights.blip2_qformer: " + str(hf_cache) in out
    assert "downloading weights.eva_vit_g: size unknown from hf-hub:lavis/eva/eva_vit_tiny.pth" in out
    assert "failed      weights.eva_vit_g" in out and "Traceback" not in out


def test_an_offline_start_still_serves_and_shows_the_commands(tmp_path):
    config = first_run_config(tmp_path, "http://127.0.0.1:9")
    with running_app(tmp_path, ["-m", "xraygpt_app.cli", "serve", "--offline"], config=config) as app:
        with urllib.request.urlopen(app.url + "config", timeout=30) as response:
            page = json.dumps(json.load(response))
        log = app.log()
    assert "Offline: nothing is downloaded" in log and "downloading" not in log
    assert f"xraygpt fetch --config {config}" in page and "Save them as" in page  # the missing-weights panel

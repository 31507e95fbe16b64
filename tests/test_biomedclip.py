"""BiomedCLIP through open_clip: a tiny model with BiomedCLIP's config layout, saved as an open_clip folder.

The folder's config names the text tower by its Hub id, exactly as the released one does; the
test points ``text_config`` at a local tiny BERT so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from helpers import REPO
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from tinyllava import PUBMEDBERT, open_clip_config

from xraygpt_app.config import load_config
from xraygpt_app.errors import BadInputError, MissingWeightsError
from xraygpt_app.zeroshot.biomedclip import HUB_ID
from xraygpt_app.zeroshot.classifier import ZeroShotClassifier


@pytest.fixture(scope="module")
def bert_tiny(medclip_fixture_dir: Path) -> Path:
    """The shared tiny BERT (config and tokenizer) that stands in for PubMedBERT."""
    return medclip_fixture_dir / "bert_tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bert_tiny) -> tuple[Path, Path, torch.nn.Module]:
    """(open_clip folder, local text config folder, the reference model that made the weights)."""
    root = tmp_path_factory.mktemp("biomedclip")
    text_dir = root / "text"
    shutil.copytree(bert_tiny, text_dir)
    build_dir = root / "build"  # config naming the local text folder, to create the reference model
    build_dir.mkdir()
    (build_dir / "open_clip_config.json").write_text(json.dumps(open_clip_config(str(text_dir))))
    torch.manual_seed(0)
    reference = open_clip.create_model(f"local-dir:{build_dir}", pretrained_text=False).eval()
    folder = root / "BiomedCLIP-tiny"
    folder.mkdir()
    # The released layout: Hub text-model name in the config, tokenizer files beside the weights.
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config(PUBMEDBERT)))
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bert_tiny / name, folder / name)
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder, text_dir, reference


def _config(tmp_path: Path, folder: Path, text_dir: Path | None):
    entry = {"kind": "biomedclip", "weights": str(folder)}
    if text_dir is not None:
        entry["text_config"] = str(text_dir)
    path = tmp_path / "zs.yaml"
    path.write_text(yaml.safe_dump({"zeroshot": {"default_model": "biomedclip", "models": {"biomedclip": entry}}}))
    return load_config(path)


def test_loads_folder_and_matches_reference(tmp_path, model_dir, samples_dir):
    folder, text_dir, reference = model_dir
    classifier = ZeroShotClassifier.from_config(_config(tmp_path, folder, text_dir))
    encoder = classifier.encoder
    assert encoder.tokenizer.context_length == 256
    assert encoder.default_template == "this is a photo of {}"
    images = [Image.open(samples_dir / "nih_cxr14_00000001_000_pa_512.png"),
              Image.open(samples_dir / "covidcxr_ARDSSevere_rgb_790x631.png")]
    prompts = ["this is a photo of pleural effusion", "this is a photo of a normal chest"]
    preprocess = image_transform_v2(PreprocessCfg(**reference.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        pixels = torch.stack([preprocess(image.convert("RGB")) for image in images])
        expected_images = reference.encode_image(pixels, normalize=True)
        tokens = tokenizer(prompts)
        expected_text = reference.encode_text(tokens, normalize=True)
    assert tokens.shape == (2, 256)
    torch.testing.assert_close(encoder.encode_images(images), expected_images, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(encoder.encode_prompts(prompts), expected_text, atol=1e-5, rtol=1e-4)
    (result,) = classifier.classify(images[:1], labels=["pleural effusion", "normal chest"])
    expected_logits = reference.logit_scale.exp() * expected_images[:1] @ encoder.encode_prompts(
        ["this is a photo of pleural effusion", "this is a photo of normal chest"]).T
    assert result.logits == pytest.approx(expected_logits[0].tolist(), abs=1e-4)


def test_uncached_text_tower_is_missing_weights(tmp_path, model_dir):
    folder, _, _ = model_dir
    with pytest.raises(MissingWeightsError, match=PUBMEDBERT):
        ZeroShotClassifier.from_config(_config(tmp_path, folder, None))


def test_bad_folder_is_a_clear_error(tmp_path, bert_tiny):
    with pytest.raises(BadInputError, match="open_clip_config.json"):
        ZeroShotClassifier.from_config(_config(tmp_path, tmp_path, None))
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config(str(bert_tiny))))
    with pytest.raises(MissingWeightsError, match="no weights file"):  # exit 3, as for any absent weights
        ZeroShotClassifier.from_config(_config(tmp_path, folder, None))
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"")  # the malformed configs below fail first
    for text, message in [("{not json", "JSONDecodeError"), ('{"a": 1}', "no 'model_cfg'"),
                          (json.dumps({"model_cfg": {"text_cfg": {"hf_model_name": str(folder)}}}), "no 'vision_cfg'")]:
        (folder / "open_clip_config.json").write_text(text)
        with pytest.raises(BadInputError, match=message):
            ZeroShotClassifier.from_config(_config(tmp_path, folder, None))


def test_real_config_points_at_the_hub_id():
    config = load_config(REPO / "eval_configs" / "xraygpt_eval.yaml")
    assert f"hf-hub:{HUB_ID}" in config.zeroshot.models["biomedclip"].weights.sources


def _cache_repo(hub: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay out a huggingface_hub cache entry (refs/main -> snapshots/<commit>/files) for an offline test."""
    commit = "0" * 40
    root = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def test_hub_id_from_the_real_config_through_the_cache(tmp_path, model_dir, samples_dir):
    """eval_configs/xraygpt_eval.yaml's `hf-hub:` BiomedCLIP, served from a huggingface_hub cache (offline)."""
    folder, text_dir, reference = model_dir
    hub = tmp_path / "hub"
    _cache_repo(hub, HUB_ID, {p.name: p for p in folder.iterdir()})
    _cache_repo(hub, PUBMEDBERT, {"config.json": text_dir / "config.json"})
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    image = samples_dir / "nih_cxr14_00000001_000_pa_512.png"
    command = [sys.executable, "-m", "xraygpt_app.cli", "classify", str(image), "--model", "biomedclip",
               "--labels", "pleural effusion,normal chest", "--json",
               "--set", "zeroshot.models.biomedclip.weights.sources=[hf-hub:" + HUB_ID + "]",
               "-c", str(REPO / "eval_configs" / "xraygpt_eval.yaml")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(done.stdout)["results"]
    preprocess = image_transform_v2(PreprocessCfg(**reference.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        image_embed = reference.encode_image(preprocess(Image.open(image).convert("RGB"))[None], normalize=True)
        text = reference.encode_text(tokenizer(["this is a photo of pleural effusion",
                                                "this is a photo of normal chest"]), normalize=True)
        expected = (reference.logit_scale.exp() * image_embed @ text.T)[0].tolist()
    assert result["logits"] == pytest.approx(expected, abs=1e-4)

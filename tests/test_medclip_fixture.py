"""The tiny MedCLIP fixture: our production path must reproduce what MedCLIP's own code produced.

Reference outputs (expected.json / expected_tensors.pt) come from RyanWangZf/MedCLIP with
transformers 4.24; tolerances are the fixture README's (atol/rtol 1e-4).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import REPO
from PIL import Image

from xraygpt_app.config import load_config
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.zeroshot.classifier import ZeroShotClassifier
from xraygpt_app.zeroshot.medclip import medclip_preprocess
from xraygpt_app.zeroshot.prompts import CHEXPERT_CLASS_PARTS, chexpert_prompts, generate_prompts

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def expected(medclip_fixture_dir) -> dict:
    return json.loads((medclip_fixture_dir / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tensors(medclip_fixture_dir) -> dict[str, torch.Tensor]:
    return torch.load(medclip_fixture_dir / "expected_tensors.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier(tiny_config: Path) -> ZeroShotClassifier:
    """Built from eval_configs/tiny_fixture.yaml exactly as the CLI does."""
    return ZeroShotClassifier.from_config(load_config(tiny_config), "medclip-vit")


def test_prompt_generator_reproduces_medclip_lists(expected):
    assert chexpert_prompts() == expected["prompts_all"]
    assert [len(v) for v in expected["prompts_all"].values()] == [210, 15, 192, 18, 54]
    # MedCLIP samples with the global `random` after seeding it; random.Random(seed) is that generator.
    assert generate_prompts(CHEXPERT_CLASS_PARTS, 10, random.Random(expected["made_with"]["seed"])) == \
        expected["prompts_n10"]


def test_logit_scale(classifier, expected):
    assert classifier.encoder.logit_scale() == pytest.approx(expected["logit_scale"], abs=1e-5)


def test_text_embeddings_per_class_batch(classifier, expected, tensors):
    embeds = classifier.text_embeddings(expected["prompts_n10"])
    for label, got in zip(expected["prompts_n10"], embeds, strict=True):
        torch.testing.assert_close(got, tensors[f"text_embeds.n10.{label}"], **TOL)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_pixels_and_image_embeddings(classifier, expected, tensors, index, samples_dir):
    case = expected["cases"][index]
    image = Image.open(samples_dir / case["image"])  # the reference opened the file as is
    assert image.mode == case["pil_mode"]
    pixels = medclip_preprocess(image).unsqueeze(0)
    torch.testing.assert_close(pixels, tensors[f"{index}.pixel_values"], **TOL)
    # The project's loader gives the same pixels for ordinary 8-bit files, so the CLI path matches too.
    loaded = load_radiograph(samples_dir / case["image"]).image
    torch.testing.assert_close(medclip_preprocess(loaded).unsqueeze(0), tensors[f"{index}.pixel_values"], **TOL)
    torch.testing.assert_close(classifier.image_embeddings([loaded]), tensors[f"{index}.image_embeds"], **TOL)


def _as_tensor(values: dict[str, float], labels) -> torch.Tensor:
    return torch.tensor([[values[label] for label in labels]])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_ensemble_logits(classifier, expected, index, samples_dir):
    case = expected["cases"][index]
    image = load_radiograph(samples_dir / case["image"]).image
    labels = list(expected["prompts_all"])
    for key, prompts, ensemble in [("ensemble_logits_all", expected["prompts_all"], "mean"),
                                   ("ensemble_logits_n10", expected["prompts_n10"], "mean"),
                                   ("max_logits_n10", expected["prompts_n10"], "max")]:
        classifier.ensemble = ensemble
        try:
            (result,) = classifier.classify([image], prompts=prompts)
        finally:
            classifier.ensemble = "mean"
        assert result.labels == labels
        torch.testing.assert_close(torch.tensor([result.logits]), _as_tensor(case[key], labels), atol=1e-4, rtol=0)
        assert result.predicted == max(case[key], key=case[key].get)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_free_text_logits_one_padded_batch(classifier, expected, index, samples_dir):
    """MedCLIPModel(**processor(text=..., padding=True)): the sentences share one padded batch."""
    case = expected["cases"][index]
    image = load_radiograph(samples_dir / case["image"]).image
    encoder = classifier.encoder
    logits = encoder.logit_scale() * encoder.encode_images([image]) @ encoder.encode_prompts(expected["free_text"]).T
    torch.testing.assert_close(logits, torch.tensor([case["free_text_logits"]]), atol=1e-4, rtol=0)


def test_preset_default_uses_configured_sampling(classifier, expected, samples_dir):
    """The tiny config samples 10 prompts per class with seed 42; labels come out in preset order."""
    image = load_radiograph(samples_dir / expected["cases"][0]["image"]).image
    (result,) = classifier.classify([image])
    assert result.labels == list(expected["prompts_all"])
    assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_default_config_path_reproduces_all_prompt_ensemble(expected, samples_dir):
    """eval_configs/zeroshot_tiny.yaml (preset chexpert5, every prompt, mean) gives MedCLIP's ensemble_logits_all."""
    classifier = ZeroShotClassifier.from_config(load_config(REPO / "eval_configs" / "zeroshot_tiny.yaml"))
    images = [load_radiograph(samples_dir / case["image"]).image for case in expected["cases"]]
    labels = list(expected["prompts_all"])
    for case, result in zip(expected["cases"], classifier.classify(images), strict=True):
        torch.testing.assert_close(torch.tensor([result.logits]), _as_tensor(case["ensemble_logits_all"], labels),
                                   atol=1e-4, rtol=0)

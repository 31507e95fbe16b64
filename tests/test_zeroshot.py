"""Zero-shot classifier, prompts and MedCLIP loading (tiny real architectures, released file layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinyzeroshot
import torch
import yaml
from PIL import Image
from torch import nn
from transformers import AutoConfig

from xraygpt_app.checkpoints import CheckpointKeyError
from xraygpt_app.config import load_config
from xraygpt_app.errors import BadInputError, ConfigError, MissingWeightsError
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.zeroshot.classifier import (
    PRESETS,
    ZeroShotClassifier,
    available_models,
    ensemble_logits,
    results_from_logits,
)
from xraygpt_app.zeroshot.medclip import (
    IMAGE_MEAN,
    IMAGE_STD,
    MedCLIP,
    medclip_preprocess,
    read_medclip_file,
    remap_medclip_state_dict,
)
from xraygpt_app.zeroshot.prompts import (
    chexpert_prompts,
    covid_prompts,
    load_prompt_file,
    parse_labels,
    rsna_prompts,
    template_prompts,
)

IMAGES = ["nih_cxr14_00000001_000_pa_512.png", "hannover_1479fa94_pa_640x755.png",
          "covidcxr_ARDSSevere_rgb_790x631.png"]


@pytest.fixture(scope="module")
def classifier(tiny_config) -> ZeroShotClassifier:
    return ZeroShotClassifier.from_config(load_config(tiny_config), "medclip-vit")


@pytest.fixture(scope="module")
def images(samples_dir) -> list[Image.Image]:
    return [Image.open(samples_dir / name) for name in IMAGES]


# --- prompts --------------------------------------------------------------------------------------

def test_chexpert_prompt_counts_and_stray_spaces():
    prompts = chexpert_prompts()
    assert [len(p) for p in prompts.values()] == [210, 15, 192, 18, 54]
    assert prompts["Edema"][0] == " pulmonary edema "  # empty severity and location keep their spaces
    assert prompts["Pleural Effusion"][1] == " left subpulmonic pleural effusion"  # severity x location x subtype
    sampled = chexpert_prompts(n=7, seed=3)
    assert sampled == chexpert_prompts(n=7, seed=3)
    assert all(len(p) == 7 and set(p) <= set(prompts[k]) for k, p in sampled.items() if k != "Cardiomegaly")
    assert sampled != chexpert_prompts(n=7, seed=4)


def test_covid_and_rsna_presets():
    covid, rsna = covid_prompts(), rsna_prompts()
    assert list(covid) == ["Normal", "COVID"]
    assert len(covid["COVID"]) == 2 * 1 * 2 * 3
    assert covid["COVID"][0] == "patchy ground glass opacity in peripheral"
    assert list(rsna) == ["Normal", "Pneumonia"]
    assert len(rsna["Pneumonia"]) == 6 * 4 * 13
    assert set(PRESETS) == {"chexpert5", "covid", "rsna"}
    for preset in PRESETS.values():
        assert tuple(preset.build(None, 0)) == preset.labels


def test_templates_labels_and_prompt_file(tmp_path):
    assert template_prompts(["edema", "no finding"], ["chest x-ray showing {}", "{} is present"]) == {
        "edema": ["chest x-ray showing edema", "edema is present"],
        "no finding": ["chest x-ray showing no finding", "no finding is present"]}
    with pytest.raises(BadInputError):
        template_prompts(["edema"], ["no placeholder"])
    for template in ("{} at {site}", "{} {0}", "{} }"):
        with pytest.raises(BadInputError, match="no braces other than"):
            template_prompts(["edema"], [template])
    assert template_prompts(["edema"], ["{{x}} {}"]) == {"edema": ["{x} edema"]}
    assert parse_labels(" edema, ,cardiomegaly,edema ") == ["edema", "cardiomegaly"]
    with pytest.raises(BadInputError):
        parse_labels(" , ")
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump({"Edema": ["pulmonary edema", "interstitial edema"], "Normal": "clear lungs"}))
    assert load_prompt_file(path) == {"Edema": ["pulmonary edema", "interstitial edema"], "Normal": ["clear lungs"]}
    path.write_text(yaml.safe_dump({"Edema": []}))
    with pytest.raises(BadInputError):
        load_prompt_file(path)


# --- scoring (pure) -------------------------------------------------------------------------------

def test_ensemble_mean_and_max_by_construction():
    image = torch.tensor([[1.0, 0.0]])
    class_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cosines 1 and 0
    class_b = torch.tensor([[-1.0, 0.0]])  # cosine -1
    mean = ensemble_logits(image, [class_a, class_b], scale=10.0, ensemble="mean")
    top = ensemble_logits(image, [class_a, class_b], scale=10.0, ensemble="max")
    assert mean.tolist() == [[5.0, -10.0]]
    assert top.tolist() == [[10.0, -10.0]]


def test_results_softmax_sigmoid_argmax():
    (result,) = results_from_logits(torch.tensor([[0.0, 2.0, -1.0]]), ["a", "b", "c"])
    assert result.predicted == "b"
    assert sum(result.probabilities) == pytest.approx(1.0)
    assert result.scores == pytest.approx([0.5, 1 / (1 + torch.e ** -2), 1 / (1 + torch.e)])
    assert result.to_dict()["labels"] == ["a", "b", "c"]


# --- classifier on the tiny MedCLIP -----------------------------------------------------------------

def test_text_embeddings_are_cached_per_prompt_set(classifier, images):
    classifier.clear_cache()
    hits, misses = classifier.cache_hits, classifier.cache_misses
    first = classifier.classify(images[:1], labels=["edema", "cardiomegaly"])
    again = classifier.classify(images[:1], labels=["edema", "cardiomegaly"])
    assert (classifier.cache_hits - hits, classifier.cache_misses - misses) == (1, 1)
    assert first[0].logits == again[0].logits
    classifier.classify(images[:1], labels=["edema", "pneumonia"])
    assert classifier.cache_misses - misses == 2


def test_cache_is_bounded(images, tiny_config):
    small = ZeroShotClassifier.from_config(load_config(tiny_config, ["zeroshot.text_cache_size=1"]), "medclip-vit")
    small.classify(images[:1], labels=["a", "b"])
    small.classify(images[:1], labels=["c", "d"])
    small.classify(images[:1], labels=["a", "b"])
    assert (small.cache_hits, small.cache_misses, len(small._text_cache)) == (0, 3, 1)


def test_batching_does_not_change_scores(classifier, images):
    classifier.batch_size = 1
    one = classifier.classify(images, preset="covid")
    classifier.batch_size = 16
    many = classifier.classify(images, preset="covid")
    for a, b in zip(one, many, strict=True):
        assert a.logits == pytest.approx(b.logits, abs=1e-5)
        assert a.labels == ["Normal", "COVID"]


def test_raw_pil_images_are_converted_as_the_loader_does(classifier, samples_dir):
    """A 16-bit PIL image handed to the Python API scores like the loader's 8-bit image, not clipped to white."""
    path = samples_dir / "cr_nema_rg1_chest_pa_16bit_gray_15bit_range_DERIVED.png"
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
        (direct,) = classifier.classify([raw], labels=["a", "b"])
    (loaded,) = classifier.classify([load_radiograph(path).image], labels=["a", "b"])
    assert direct.logits == pytest.approx(loaded.logits, abs=1e-5)


def test_request_errors(classifier, images):
    with pytest.raises(BadInputError, match="not several"):
        classifier.classify(images[:1], labels=["a"], preset="covid")
    with pytest.raises(BadInputError, match="unknown preset"):
        classifier.classify(images[:1], preset="nope")
    with pytest.raises(BadInputError):
        classifier.classify([], labels=["a"])


def test_missing_weights_and_unknown_model(tmp_path, tiny_config):
    config = load_config(tiny_config, [f"zeroshot.models.medclip-vit.weights={tmp_path / 'absent.bin'}"])
    status = available_models(config)
    assert status["medclip-vit"] is not None
    assert "absent.bin" in status["medclip-vit"]
    with pytest.raises(MissingWeightsError, match="absent.bin"):
        ZeroShotClassifier.from_config(config, "medclip-vit")
    with pytest.raises(BadInputError, match="unknown zero-shot model"):
        ZeroShotClassifier.from_config(load_config(tiny_config), "nope")
    assert available_models(load_config(tiny_config)) == {"medclip-vit": None}
    # Tower configs named by Hub id are read from the cache only: a clear missing-weights error, no download.
    uncached = load_config(tiny_config, ["zeroshot.models.medclip-vit.text_config=hf-hub:xraygpt-test/absent-bert"])
    with pytest.raises(MissingWeightsError, match="xraygpt-test/absent-bert"):
        ZeroShotClassifier.from_config(uncached, "medclip-vit")


# --- MedCLIP checkpoint handling ------------------------------------------------------------------

def test_remap_is_pure_and_rejects_unknown_keys(medclip_fixture_dir):
    released = torch.load(medclip_fixture_dir / "medclip_vit_tiny" / "pytorch_model.bin", weights_only=True)
    before = dict(released)
    remapped = remap_medclip_state_dict(released)
    assert released.keys() == before.keys()
    assert "vision_model.model.encoder.layers.0.blocks.0.attention.q_proj.weight" in remapped
    assert not any("relative_position_index" in k or "position_ids" in k for k in remapped)
    with pytest.raises(CheckpointKeyError, match="visual.proj"):
        remap_medclip_state_dict({**released, "visual.proj": torch.zeros(1)})


def test_truncated_checkpoint_fails_strictly(tmp_path, medclip_fixture_dir, tiny_config):
    released = torch.load(medclip_fixture_dir / "medclip_vit_tiny" / "pytorch_model.bin", weights_only=True)
    released.pop("text_model.model.pooler.dense.bias")
    torch.save(released, tmp_path / "pytorch_model.bin")
    config = load_config(tiny_config, [f"zeroshot.models.medclip-vit.weights={tmp_path / 'pytorch_model.bin'}"])
    with pytest.raises(CheckpointKeyError, match="pooler.dense.bias"):
        ZeroShotClassifier.from_config(config, "medclip-vit")


def test_resnet_variant_from_released_zip(tmp_path, images, medclip_fixture_dir):
    archive, resnet = tinyzeroshot.medclip_resnet_zip(tmp_path)
    assert "vision_model.model.fc.weight" in read_medclip_file(archive)
    config_path = tmp_path / "zs.yaml"
    config_path.write_text(yaml.safe_dump({"zeroshot": {"default_model": "r", "models": {"r": {
        "kind": "medclip-resnet", "weights": str(archive), "text_config": str(medclip_fixture_dir / "bert_tiny")}}}}))
    classifier = ZeroShotClassifier.from_config(load_config(config_path))
    assert classifier.encoder.logit_scale() == pytest.approx(float(torch.tensor(4.0).exp()))
    got = classifier.image_embeddings(images)
    with torch.no_grad():  # reference: the torchvision module that made the weights
        pixels = torch.stack([medclip_preprocess(image) for image in images]).repeat(1, 3, 1, 1)
        expected = nn.functional.normalize(resnet(pixels), dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(BadInputError, match="MedCLIP-resnet checkpoint"):
        config_path.write_text(yaml.safe_dump({"zeroshot": {"models": {"r": {
            "kind": "medclip-vit", "weights": str(archive), "text_config": str(medclip_fixture_dir / "bert_tiny"),
            "vision_config": str(medclip_fixture_dir / "swin_tiny")}}}}))
        ZeroShotClassifier.from_config(load_config(config_path), "r")


def test_logit_scale_is_clamped_like_medclip(medclip_fixture_dir):
    model = MedCLIP("vit", AutoConfig.from_pretrained(medclip_fixture_dir / "bert_tiny"), 64,
                    AutoConfig.from_pretrained(medclip_fixture_dir / "swin_tiny"))
    with torch.no_grad():
        model.logit_scale.fill_(6.0)
        assert model.scale() == pytest.approx(float(np.exp(4.6052)), rel=1e-6)  # at most 100
        model.logit_scale.fill_(-1.0)
        assert model.scale() == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        ZeroShotClassifier.from_config(load_config(tiny_config, ["runtime.device=cuda"]), "medclip-vit")


def test_unusable_weights_files_are_clear_errors(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(MissingWeightsError, match="holds no pytorch_model.bin"):
        read_medclip_file(tmp_path / "folder")
    archive = tmp_path / "medclip-vit-pretrained.zip"
    archive.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(BadInputError, match="cannot read MedCLIP weights"):
        read_medclip_file(archive)


def test_tower_configs_of_the_wrong_kind_are_clear_errors(tmp_path, medclip_fixture_dir, tiny_config):
    swapped = f"zeroshot.models.medclip-vit.vision_config={medclip_fixture_dir / 'bert_tiny'}"
    with pytest.raises(BadInputError, match="bert config; MedCLIP needs a swin one"):
        ZeroShotClassifier.from_config(load_config(tiny_config, [swapped]), "medclip-vit")
    (tmp_path / "config.json").write_text("{}")
    empty = f"zeroshot.models.medclip-vit.text_config={tmp_path}"
    with pytest.raises(BadInputError, match="not a transformers bert config"):
        ZeroShotClassifier.from_config(load_config(tiny_config, [empty]), "medclip-vit")


def test_preprocess_pads_to_a_grey_square():
    """A wide white RGB image: black bands above and below, one channel, MedCLIP's normalisation."""
    pixels = medclip_preprocess(Image.new("RGB", (448, 224), (255, 255, 255)))
    assert pixels.shape == (1, 224, 224)
    black, white = (0 - IMAGE_MEAN) / IMAGE_STD, (1 - IMAGE_MEAN) / IMAGE_STD
    assert pixels[0, 0, 112].item() == pytest.approx(black, abs=1e-5)
    assert pixels[0, 112, 112].item() == pytest.approx(white, abs=1e-5)


def test_tower_config_repos_lists_the_hub_configs_the_real_config_reads() -> None:
    from xraygpt_app.config import load_config
    from xraygpt_app.zeroshot.classifier import tower_config_repos

    repos = tower_config_repos(load_config(Path(__file__).parents[1] / "eval_configs" / "xraygpt_eval.yaml"))
    assert repos["zeroshot.models.medclip-vit.vision_config"] == "microsoft/swin-tiny-patch4-window7-224"
    assert repos["zeroshot.models.medclip-vit.text_config"] == "emilyalsentzer/Bio_ClinicalBERT"
    assert repos["zeroshot.models.medclip-resnet.text_config"] == "emilyalsentzer/Bio_ClinicalBERT"

"""Explainability maps on tiny real-format models: geometry, every model kind, no side effects, faithfulness."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, ImageDraw

from xraygpt_app.api import Assistant
from xraygpt_app.config import VisionConfig, load_config
from xraygpt_app.errors import BadInputError
from xraygpt_app.explain import figure_png, overlay, report_heatmap, zeroshot_heatmaps
from xraygpt_app.explain.faithfulness import (
    cascade_correlations,
    cascade_layers,
    report_deletion,
    zeroshot_deletion,
)
from xraygpt_app.explain.geometry import (
    InputGeometry,
    medclip_geometry,
    to_image,
    torchvision_geometry,
    xraygpt_geometry,
)
from xraygpt_app.explain.report_maps import span_token_indices, teacher_forced_logprobs
from xraygpt_app.families.xraygpt.vision import preprocess
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.zeroshot.classifier import ZeroShotClassifier
from xraygpt_app.zeroshot.medclip import medclip_preprocess

IMAGES = ["nih_cxr14_00000001_000_pa_512.png", "hannover_1479fa94_pa_640x755.png",
          "covidcxr_ARDSSevere_rgb_790x631.png"]
MONO1 = "cr_nema_rg1_chest_pa_mono1_15bit_uncompressed_DERIVED.dcm"


@pytest.fixture(scope="module")
def images(samples_dir) -> list[Image.Image]:
    return [load_radiograph(samples_dir / name).image for name in IMAGES]


@pytest.fixture(scope="module")
def classifiers(three_kinds_config: Path) -> dict[str, ZeroShotClassifier]:
    """The three zero-shot model kinds, each loaded from its released file layout through from_config."""
    loaded = load_config(three_kinds_config)
    return {name: ZeroShotClassifier.from_config(loaded, name) for name in ("medclip-vit", "medclip-resnet",
                                                                             "biomedclip")}


@pytest.fixture(scope="module")
def xraygpt(tiny_assistant: Assistant) -> Assistant:
    return tiny_assistant


# --- geometry: a bright square must land where it was drawn -------------------------------------------------

def _square(width: int, height: int, box: tuple[int, int, int, int]) -> tuple[Image.Image, np.ndarray]:
    image = Image.new("L", (width, height), 20)
    ImageDraw.Draw(image).rectangle(box, fill=250)
    return image, np.asarray(image) > 128


def _landed(pixels: torch.Tensor, geometry: InputGeometry) -> np.ndarray:
    """The model input's own brightness, as a map, carried back onto the image."""
    grid = pixels[0].mean(dim=0).numpy() if pixels.dim() == 4 else pixels.mean(dim=0).numpy()
    grid = (grid - grid.min()) / (grid.max() - grid.min())
    return to_image(grid, geometry)


def _iou(mapped: np.ndarray, drawn: np.ndarray) -> float:
    found = np.nan_to_num(mapped, nan=0) > 0.5
    return float((found & drawn).sum() / (found | drawn).sum())


@pytest.mark.parametrize("size,box", [((600, 300), (400, 100, 459, 159)), ((300, 640), (40, 500, 99, 579))])
def test_xraygpt_squeeze_maps_back(size, box):
    image, drawn = _square(*size, box)
    mapped = _landed(preprocess(image, VisionConfig()), xraygpt_geometry(*size, 224))
    assert not np.isnan(mapped).any()  # the squeeze keeps every pixel
    assert _iou(mapped, drawn) > 0.85


@pytest.mark.parametrize("size,box", [((600, 300), (400, 100, 459, 159)), ((150, 120), (10, 80, 39, 109))])
def test_medclip_grey_square_pad_maps_back(size, box):
    image, drawn = _square(*size, box)
    mapped = _landed(medclip_preprocess(image), medclip_geometry(*size))
    assert not np.isnan(mapped).any()  # padding adds canvas, it never cuts the image
    assert _iou(mapped, drawn) > 0.85


def test_biomedclip_centre_crop_maps_back_and_marks_unseen_borders(classifiers):
    encoder = classifiers["biomedclip"].encoder
    image, drawn = _square(600, 300, (200, 100, 259, 159))
    geometry = torchvision_geometry(600, 300, encoder.preprocess)
    assert (geometry.resized_w, geometry.resized_h, geometry.crop_x, geometry.crop_y) == (448, 224, 112, 0)
    mapped = _landed(encoder.pixel_values([image]), geometry)
    assert _iou(mapped, drawn) > 0.85
    seen = ~np.isnan(mapped)
    assert seen[:, 150:450].all()
    assert not seen[:, :149].any()
    assert not seen[:, 451:].any()
    hidden, _ = _square(600, 300, (20, 100, 79, 159))  # drawn in the cropped-away border: the model never sees it
    assert encoder.pixel_values([hidden])[0].std(dim=(1, 2)).max() < 1e-6


def test_dicom_monochrome1_square_lands_on_the_displayed_image(samples_dir):
    ds = pydicom.dcmread(samples_dir / MONO1)
    pixels = np.full((245, 231), 26000, dtype=ds.pixel_array.dtype)
    pixels[40:80, 150:190] = 900  # low values are bright in MONOCHROME1
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer)
    shown = load_radiograph(buffer.getvalue()).image  # windowed, inverted: what the user sees
    drawn = np.asarray(shown.convert("L")) > 128
    assert drawn[40:80, 150:190].all()
    assert drawn.sum() == 40 * 40
    mapped = _landed(medclip_preprocess(shown), medclip_geometry(*shown.size))
    assert _iou(mapped, drawn) > 0.8


# --- maps for every model kind; maps change no score -------------------------------------------------------

@pytest.mark.parametrize("name,grid", [("medclip-vit", 7), ("medclip-resnet", 7), ("biomedclip", 14)])
def test_zeroshot_maps_for_every_kind_change_no_score(classifiers, images, name, grid):
    classifier = classifiers[name]
    image = images[1]
    before = classifier.classify([image], preset="chexpert5")[0]
    flags = [p.requires_grad for p in classifier.encoder.model.parameters()]
    maps = zeroshot_heatmaps(classifier, image, preset="chexpert5")
    after = classifier.classify([image], preset="chexpert5")[0]
    assert after.logits == before.logits
    assert after.probabilities == before.probabilities
    assert [p.requires_grad for p in classifier.encoder.model.parameters()] == flags
    assert all(p.grad is None for p in classifier.encoder.model.parameters())
    assert [m.label for m in maps] == before.labels
    np.testing.assert_allclose([m.target for m in maps], before.logits, rtol=1e-4, atol=1e-4)
    for heatmap in maps:
        assert heatmap.grid.shape == (grid, grid)
        assert heatmap.image_map.shape == (image.height, image.width)
        assert heatmap.grid.max() == pytest.approx(1.0)
        assert heatmap.grid.min() >= 0
    assert len({m.grid.tobytes() for m in maps}) == len(maps)  # one map per label, not one per image


def test_only_some_labels_and_occlusion(classifiers, images):
    classifier = classifiers["medclip-vit"]
    (one,) = zeroshot_heatmaps(classifier, images[0], preset="chexpert5", only=["Edema"])
    assert one.label == "Edema"
    (occluded,) = zeroshot_heatmaps(classifier, images[0], preset="chexpert5", only=["Edema"], method="occlusion",
                                    occlusion_grid=4)
    assert occluded.grid.shape == (4, 4)
    assert "occlusion" in occluded.method
    with pytest.raises(BadInputError, match="no such label"):
        zeroshot_heatmaps(classifier, images[0], preset="chexpert5", only=["Nope"])


def test_max_ensemble_maps_explain_the_max_logit(classifiers, images):
    classifier = classifiers["medclip-vit"]
    classifier.ensemble = "max"
    try:
        logits = classifier.classify([images[0]], preset="chexpert5")[0].logits
        maps = zeroshot_heatmaps(classifier, images[0], preset="chexpert5")
    finally:
        classifier.ensemble = "mean"
    np.testing.assert_allclose([m.target for m in maps], logits, rtol=1e-4, atol=1e-4)


def test_overlay_and_figure(classifiers, images, tmp_path):
    image = images[0]
    heatmap = zeroshot_heatmaps(classifiers["biomedclip"], image, labels=["effusion"])[0]
    assert np.array_equal(np.asarray(overlay(image, heatmap, 0.0)), np.asarray(image.convert("RGB")))
    full = np.asarray(overlay(image, heatmap, 1.0)).astype(int)
    assert full.shape == (image.height, image.width, 3)
    assert np.abs(full - np.asarray(image.convert("RGB"))).max() > 50
    data = figure_png(image, heatmap, path=tmp_path / "map.png")
    assert data.startswith(b"\x89PNG")
    assert (tmp_path / "map.png").read_bytes() == data


# --- report maps ----------------------------------------------------------------------------------------------

def test_teacher_forcing_replays_the_greedy_turn(xraygpt, images):
    session = xraygpt.chat(images[0])
    turn = session.ask("Describe the findings.", do_sample=False, max_new_tokens=12)
    pixels = preprocess(images[0], xraygpt.config.vision)
    with torch.no_grad():
        logprobs = teacher_forced_logprobs(xraygpt.model, pixels, turn, len(turn.token_ids) - 1)
    assert logprobs.argmax(dim=-1).tolist() == turn.token_ids  # the recorded tokens were each the greedy choice


def test_report_map_changes_no_token(xraygpt, images):
    image = images[1]
    plain = xraygpt.chat(image)
    plain.ask("Describe the findings.", do_sample=False, max_new_tokens=10)
    expected = plain.ask("Is there effusion?", do_sample=False, max_new_tokens=10).token_ids
    session = xraygpt.chat(image)
    turn = session.ask("Describe the findings.", do_sample=False, max_new_tokens=10)
    word = turn.answer.split()[1]
    heatmap = report_heatmap(session, image, span=word)
    assert heatmap.grid.shape == (16, 16)
    assert heatmap.image_map.shape == (image.height, image.width)
    assert word.lower() in heatmap.label.lower()
    assert heatmap.target < 0
    assert session.ask("Is there effusion?", do_sample=False, max_new_tokens=10).token_ids == expected
    assert all(not p.requires_grad and p.grad is None for p in xraygpt.model.llm.parameters())


def test_report_map_requests(xraygpt, images):
    session = xraygpt.chat(images[0])
    with pytest.raises(BadInputError, match="no answer"):
        report_heatmap(session, images[0])
    turn = session.ask("Describe the findings.", do_sample=False, max_new_tokens=8)
    with pytest.raises(BadInputError, match="does not occur"):
        report_heatmap(session, images[0], span="zzzz not there")
    with pytest.raises(BadInputError, match="not the one"):
        report_heatmap(session, images[1])
    whole, _ = span_token_indices(xraygpt.model, turn.token_ids, None)
    assert whole
    assert len(whole) <= len(turn.token_ids)


# --- faithfulness (Adebayo et al. 2018; deletion) ---------------------------------------------------------------

def test_zeroshot_map_changes_as_layers_are_randomised(images, tiny_config):
    classifier = ZeroShotClassifier.from_config(load_config(tiny_config))  # its own copy: it gets randomised
    steps = cascade_correlations(cascade_layers(classifier.encoder),
                                 lambda: zeroshot_heatmaps(classifier, images[0], only=["Edema"])[0].grid)
    assert len(steps) == 7, steps
    assert all(rho < 0.95 for _, rho in steps), steps


def test_report_map_changes_as_layers_are_randomised(images, tiny_config):
    model = Assistant.from_config(tiny_config)
    session = model.chat(images[0])
    turn = session.ask("Describe the findings.", do_sample=False, max_new_tokens=8)
    steps = cascade_correlations(cascade_layers(model.model), lambda: report_heatmap(session, images[0],
                                                                                      turn=turn).raw_grid)
    assert all(rho < 0.95 for _, rho in steps), steps


def test_deleting_salient_cells_lowers_the_zeroshot_score_more_than_random(classifiers, images):
    top, random = np.mean(zeroshot_deletion(classifiers["medclip-vit"], images), axis=0)
    assert top > random, (top, random)


def test_deleting_salient_patches_lowers_the_words_logprob_more_than_random(xraygpt, images):
    top, random = np.mean(report_deletion(xraygpt.chat, images, "Describe the findings.", 8), axis=0)
    assert top > random, (top, random)


def test_llava_family_report_map_on_its_patch_tokens(tiny_llava):
    model = Assistant.from_config(tiny_llava.config)
    image, _ = _square(600, 300, (200, 100, 259, 159))
    session = model.chat(image)
    turn = session.ask("Describe the findings.", do_sample=False, max_new_tokens=8)
    pixels = model.model.tower.preprocess(image)
    with torch.no_grad():
        logprobs = teacher_forced_logprobs(model.model, pixels, turn, len(turn.token_ids) - 1)
    assert logprobs.argmax(dim=-1).tolist() == turn.token_ids
    heatmap = report_heatmap(session, image)
    assert heatmap.grid.shape == (14, 14)
    assert heatmap.model == "llava"
    seen = ~np.isnan(heatmap.image_map)  # BiomedCLIP's centre crop: the side borders were never seen
    assert seen[:, 150:450].all()
    assert not seen[:, :149].any()
    assert not seen[:, 451:].any()
    again = model.chat(image).ask("Describe the findings.", do_sample=False, max_new_tokens=8)
    assert again.token_ids == turn.token_ids


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
def test_report_maps_in_8bit_and_a_clear_refusal_in_4bit(quant_xraygpt):
    quant = quant_xraygpt  # 4-bit needs multiples of 64
    image = Image.linear_gradient("L").resize((96, 80))
    session = Assistant.from_config(quant.config, ["runtime.mode=8bit"]).chat(image)
    session.ask("Describe the findings.", do_sample=False, max_new_tokens=6)
    assert np.abs(report_heatmap(session, image).raw_grid).sum() > 0
    session = Assistant.from_config(quant.config, ["runtime.mode=4bit"]).chat(image)
    session.ask("Describe the findings.", do_sample=False, max_new_tokens=6)
    with pytest.raises(BadInputError, match="no gradient reaches the image"):
        report_heatmap(session, image)

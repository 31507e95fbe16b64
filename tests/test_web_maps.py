"""The web app's map handlers (zero-shot "Show map", chat "Where did it look?", the classify endpoint)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from helpers import UI_GREEDY
from PIL import Image

from xraygpt_app.web import api as ui_api
from xraygpt_app.web import handlers as h
from xraygpt_app.web import maps

GREEDY = {**UI_GREEDY, "max_new_tokens": 10}


@pytest.fixture(scope="module")
def services(tiny_services):
    return tiny_services


@pytest.fixture
def loaded(services, samples_dir) -> h.UserState:
    data = (samples_dir / "hannover_00870a9c_ap_bedside_640x524.png").read_bytes()
    state, _, _, note = h.load_image(None, data, services.config.image)
    assert note == ""
    return state


def _overlay(html_text: str) -> Image.Image:
    (payload,) = re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_zeroshot_map_shows_an_overlay_with_its_meaning(services, loaded):
    before = h.classify(loaded, services, "medclip-vit", "chexpert5", "")[1]
    html_text, heatmap, note = maps.zeroshot_map(loaded, services, "medclip-vit", "chexpert5", "", "Edema", 0.5)
    assert note == ""
    assert heatmap.label == "Edema"
    assert heatmap.grid.shape == (7, 7)
    assert "not a segmentation, not a diagnosis" in html_text
    assert "not seen by the model" in html_text
    assert _overlay(html_text).size == (640, 524)  # the displayed image, not the model input
    assert heatmap.image_map.size == 0
    assert maps.restyle(loaded, heatmap, 0.5) == html_text  # kept slim, same picture
    assert h.classify(loaded, services, "medclip-vit", "chexpert5", "")[1] == before
    faded = maps.restyle(loaded, heatmap, 0.0)
    assert (np.asarray(_overlay(faded)) == np.asarray(loaded.image.convert("RGB"))).all()  # 640 px: not scaled


def test_map_requests_that_cannot_work_are_notices(services, loaded):
    assert "Upload" in maps.zeroshot_map(None, services, "medclip-vit", "chexpert5", "", "Edema", 0.5)[2]
    assert "Classify first" in maps.zeroshot_map(loaded, services, "medclip-vit", "chexpert5", "", None, 0.5)[2]
    assert "no such label" in maps.zeroshot_map(loaded, services, "medclip-vit", "chexpert5", "", "Nope", 0.5)[2]
    assert "first" in maps.report_map(loaded, services, 0, "", 0.5)[2]


def test_report_map_of_an_answer_and_of_its_words(services, loaded):
    list(h.generate_report(loaded, services, GREEDY))
    list(h.ask(loaded, services, "Is there effusion?", GREEDY))
    tokens = [turn.token_ids for turn in loaded.session.turns]
    html_text, heatmap, note = maps.report_map(loaded, services, 1, "", 0.5)
    assert note == ""
    assert heatmap.grid.shape == (16, 16)
    assert "not a diagnosis" in html_text
    word = loaded.session.turns[-1].answer.split()[0]
    _, worded, note = maps.report_map(loaded, services, 0, word, 0.5)
    assert note == ""
    assert word.lower() in worded.label.lower()
    assert "There are 2 answers" in maps.report_map(loaded, services, 5, "", 0.5)[2]
    assert "does not occur" in maps.report_map(loaded, services, 0, "zzzz absent", 0.5)[2]
    assert [turn.token_ids for turn in loaded.session.turns] == tokens


def test_classify_endpoint_returns_maps_only_when_asked(services, samples_dir):
    data = (samples_dir / "nih_cxr14_00000001_000_pa_512.png").read_bytes()
    plain = ui_api.api_classify(services, data, "medclip-vit", "chexpert5", "")
    mapped = ui_api.api_classify(services, data, "medclip-vit", "chexpert5", "", heatmaps=True)
    assert "heatmaps" not in plain
    assert {k: mapped[k] for k in plain} == plain
    assert [m["label"] for m in mapped["heatmaps"]] == plain["labels"]
    first = mapped["heatmaps"][0]
    assert len(first["grid"]) == 7
    assert first["image_size"] == [512, 512]
    assert "not a diagnosis" in first["meaning"]
    assert first["overlay_png"].startswith("data:image/png;base64,")


def test_vqa_map_of_the_last_answer(services, loaded):
    assert "Answer a question first" in maps.vqa_map(loaded, services, "", 0.5)[2]
    *_, (answer, note) = h.vqa_answer(loaded, services, "Is the heart size normal?", GREEDY)
    assert note == ""
    assert loaded.vqa_turn is not None
    html_text, heatmap, note = maps.vqa_map(loaded, services, "", 0.5)
    assert note == ""
    assert heatmap.grid.shape == (16, 16)
    assert "not a diagnosis" in html_text
    h.clear_chat(loaded)  # a new conversation forgets the answer the map was of
    assert loaded.vqa_turn is None

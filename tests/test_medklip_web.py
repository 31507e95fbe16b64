"""MedKLIP in the web app, and the zero-shot tab's map always belonging to the result shown."""

from __future__ import annotations

import pytest
from helpers import SHARED

from xraygpt_app.config import load_config
from xraygpt_app.web import handlers as h
from xraygpt_app.web import labels, maps
from xraygpt_app.web.services import build_services

MEDCLIP = SHARED / "fixtures" / "medclip_tiny"
MEDKLIP = SHARED / "fixtures" / "medklip_tiny"


@pytest.fixture(scope="module")
def services(tmp_path_factory, shared_dir):
    """The tiny MedCLIP and MedKLIP side by side, and a MedKLIP entry whose checkpoint is absent."""
    folder = tmp_path_factory.mktemp("web")
    path = folder / "zeroshot.yaml"
    path.write_text(f"""weights:
  cache_dir: {folder / 'cache'}
zeroshot:
  default_model: medclip-vit
  preset: chexpert5
  models:
    medclip-vit:
      kind: medclip-vit
      weights: {MEDCLIP / 'medclip_vit_tiny' / 'pytorch_model.bin'}
      vision_config: {MEDCLIP / 'swin_tiny'}
      text_config: {MEDCLIP / 'bert_tiny'}
    medklip:
      kind: medklip
      weights: {MEDKLIP / 'checkpoint_final.pth'}
      text_config: {MEDKLIP / 'bert_tiny'}
      entity_descriptions: "{MEDKLIP / 'observation explanation.json'}"
    medklip-absent:
      kind: medklip
      weights:
        sources: [{folder / 'absent.pth'}]
        how_to_get: download checkpoint_final.pth from MedKLIP's Google Drive folder
      text_config: {MEDKLIP / 'bert_tiny'}
      entity_descriptions: "{MEDKLIP / 'observation explanation.json'}"
""", encoding="utf-8")
    return build_services(load_config(path), with_assistant=False)


@pytest.fixture
def loaded(services) -> h.UserState:
    """The bundled 640 x 524 bedside example, loaded as its button does."""
    state, _, _, note = h.load_example(None, "Hannover AP bedside", services.config.image)
    assert note == ""
    assert state.image.size == (640, 524)
    return state


def test_medklip_is_listed_with_its_entities_and_presets(services):
    assert ("MedKLIP", "medklip") in h.model_choices(services)
    assert "absent.pth" in services.zeroshot_missing["medklip-absent"]
    assert "Google Drive" in services.zeroshot_missing["medklip-absent"]
    controls = labels.controls(services, "medklip")
    assert len(controls["entities"]) == 75
    assert "pneumothorax" in controls["entities"]
    assert [key for _, key in controls["presets"][:-1]] == ["cxr14", "chexpert5", "all"]
    assert controls["preset"] == "chexpert5"
    assert "present vs absent" in controls["chart"]
    clip = labels.controls(services, "medclip-vit")
    assert clip["entities"] == []
    assert ("COVID", "covid") in clip["presets"]


def test_entities_and_described_findings_from_the_tab(services, loaded):
    _, rows, note = h.classify(loaded, services, "medklip", h.CUSTOM,
                               "lung cancer: A malignant tumour of the lung, seen as a mass.", ["effusion", "tube"])
    assert note == ""
    assert sorted(row[0] for row in rows) == ["effusion", "lung cancer", "tube"]
    _, rows, note = h.classify(loaded, services, "medklip", h.CUSTOM, "lung cancer")
    assert rows == []
    assert "'lung cancer' is not one of MedKLIP's 75 entities and has no description" in note
    _, rows, _ = h.classify(loaded, services, "medklip", "all", "")
    assert len(rows) == 75


def test_show_map_uses_medklips_grounding_and_names_it(services, loaded):
    h.classify(loaded, services, "medklip", "cxr14", "")
    html_text, heatmap, note = maps.zeroshot_map(loaded, services, "medklip", "cxr14", "", "pneumonia", 0.5)
    assert note == ""
    assert heatmap.grid.shape == (14, 14)
    assert "MedKLIP cross-attention (mean of the last 4 decoder layers)" in html_text
    assert "attention, not a segmentation, not a diagnosis" in html_text
    assert "most attended" in html_text
    _, cam, note = maps.zeroshot_map(loaded, services, "medklip", "cxr14", "", "pneumonia", 0.5, method="grad-cam")
    assert note == ""
    assert "Grad-CAM" in cam.method


def _zeroshot_event(demo, button: str):
    """The function and outputs (by elem_id) that the app runs when ``button`` is clicked."""
    ids = {block_id: getattr(block, "elem_id", None) for block_id, block in demo.blocks.items()}
    for fn in demo.fns.values():
        if any(ids.get(target[0]) == button for target in fn.targets):
            return fn.fn, [getattr(block, "elem_id", None) for block in fn.outputs]
    raise AssertionError(f"no event for {button}")


def test_classifying_again_never_leaves_the_previous_map(services, loaded):
    """A Cardiomegaly map was seen under a Normal/COVID table: Classify must clear the map it replaces."""
    from xraygpt_app.web.ui import build_app

    demo = build_app(services)
    classify, outputs = _zeroshot_event(demo, "zs-run")
    show, _ = _zeroshot_event(demo, "zs-map-show")
    first = classify(loaded, "medclip-vit", "chexpert5", "", [])
    assert first[outputs.index("zs-notice")] == ""
    view, kept, _ = show(loaded, "medclip-vit", "chexpert5", "", [], "Cardiomegaly", "own", 0.5)
    assert "Cardiomegaly" in view
    assert kept is not None
    again = classify(loaded, "medclip-vit", "covid", "", [])
    assert "zs-map" in outputs
    assert again[outputs.index("zs-map")] == ""
    assert again[outputs.index("zs-map-notice")] == ""
    kept_index = [i for i, name in enumerate(outputs) if name is None]
    assert kept_index
    assert all(again[i] is None for i in kept_index)  # the kept Heatmap (gr.State) is dropped

"""The web app's handlers on the tiny real-format models, without a browser or a server."""

from __future__ import annotations

import base64
import re

import pytest
from helpers import UI_GREEDY

from xraygpt_app.config import load_config
from xraygpt_app.web import api as ui_api
from xraygpt_app.web import handlers as h
from xraygpt_app.web.services import build_services

GREEDY = UI_GREEDY


@pytest.fixture(scope="module")
def services(tiny_services):
    return tiny_services


@pytest.fixture
def png_bytes(samples_dir) -> bytes:
    return (samples_dir / "nih_cxr14_00000001_000_pa_512.png").read_bytes()


@pytest.fixture
def loaded(services, png_bytes) -> h.UserState:
    state, _, _, note = h.load_image(None, png_bytes, services.config.image)
    assert note == ""
    return state


def _run(outputs) -> list:
    return list(outputs)


def test_upload_gives_preview_and_description(services, png_bytes):
    state, preview, description, note = h.load_image(None, png_bytes, services.config.image, model_size=224)
    assert note == "" and state.image is not None and state.image.mode in ("L", "RGB")
    assert preview.count("data:image/png;base64,") == 2  # the decoded image and the 224 px model input
    assert "512 × 512" in description and "PNG" in description
    assert state.messages == [] and state.session is None


def test_the_loaded_file_name_is_kept_in_the_session_and_escaped(services, png_bytes):
    from xraygpt_app.web.display import loaded_file_html

    name = 'chest <img src=x onerror="alert(1)">.png'
    state, _, _, note = h.load_image(None, png_bytes, services.config.image, name=name)
    assert note == "" and state.file_name == name
    shown = loaded_file_html(state.file_name)
    assert "<img" not in shown and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.png" in shown
    state, _, _, note = h.load_image(state, b"not an image", services.config.image, name="other.png")
    assert note and state.file_name == name  # a refused file leaves the loaded one (and its name) in place
    assert h.load_example(None, "NIH PA (512 px)", services.config.image)[0].file_name == h.EXAMPLES["NIH PA (512 px)"]


def test_dicom_upload_is_described_without_identity(services, samples_dir):
    data = (samples_dir / "cr_siim_chest_pa_mono2_jpeg_baseline.dcm").read_bytes()
    state, preview, description, note = h.load_image(None, data, services.config.image)
    assert note == "" and state.image is not None and "data:image/png" in preview
    assert "DICOM" in description and "PA" in description
    assert "16d7f894" not in description  # the pseudonymised patient id stays out of the page


def test_dicom_header_text_cannot_inject_markdown(services, samples_dir):
    import io

    import pydicom

    ds = pydicom.dcmread(samples_dir / "dx_canine_thorax_lateral_mono1_8bit_explicit_vr.dcm")
    ds.ViewPosition, ds.BodyPartExamined = "![](//ex.co/a)", "[c](//ev.co)"  # an image fetch and a link
    buffer = io.BytesIO()
    ds.save_as(buffer)
    _, _, description, note = h.load_image(None, buffer.getvalue(), services.config.image)
    assert note == "" and "ex.co" in description and "ev.co" in description.lower()
    assert re.search(r"(?<!\\)[\[\]!<]", description) is None  # every bracket, ! and < escaped


def test_corrupt_upload_is_a_notice_and_keeps_the_old_image(services, loaded):
    state, preview, description, note = h.load_image(loaded, b"\x89PNG\r\n\x1a\n" + b"\0" * 300)
    assert note.startswith("⚠️") and len(note) > 10
    assert state is loaded and state.image is not None and preview == "" and description == ""


def test_read_upload_deletes_only_files_under_the_upload_root(tmp_path):
    root = tmp_path / "cache"
    (root / "abc").mkdir(parents=True)
    inside, outside = root / "abc" / "x.png", tmp_path / "keep.png"
    inside.write_bytes(b"secret")
    outside.write_bytes(b"mine")
    assert h.read_upload(inside, root) == b"secret"
    assert not inside.exists() and not (root / "abc").exists()
    assert h.read_upload(outside, root) == b"mine" and outside.exists()


def test_example_buttons_load_the_bundled_files(services):
    for name, filename in h.EXAMPLES.items():
        assert (h.EXAMPLES_DIR / filename).is_file()
        state, preview, _, note = h.load_example(None, name, services.config.image)
        assert note == "" and state.image is not None and preview
    assert "ATTRIBUTION" in " ".join(p.name for p in h.EXAMPLES_DIR.iterdir())


def test_report_streams_into_the_chat_and_records_the_turn(services, loaded):
    outputs = _run(h.generate_report(loaded, services, GREEDY))
    texts = [messages[-1]["content"] for messages, *_ in outputs[:-1]]
    assert len(texts) >= 2, "the answer should arrive in several pieces"
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
    messages, state, note, download = outputs[-1]
    turn = state.session.turns[-1]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == turn.question and messages[1]["content"] == turn.answer
    assert note == "" and not turn.cancelled
    markdown = base64.b64decode(re.search(r"base64,([^\"]+)", download).group(1)).decode()
    assert h.DISCLAIMER in markdown and turn.answer in markdown and turn.question in markdown


def test_follow_up_continues_the_same_conversation(services, loaded):
    _run(h.generate_report(loaded, services, GREEDY))
    session = loaded.session
    messages, state, note, _ = _run(h.ask(loaded, services, "Is there evidence of pleural effusion?", GREEDY))[-1]
    assert state.session is session and len(session.turns) == 2
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[2]["content"] == "Is there evidence of pleural effusion?"


def test_regenerate_replaces_the_last_answer(services, loaded):
    _run(h.generate_report(loaded, services, GREEDY))
    sampled = dict(GREEDY, do_sample=True, seed=7)
    messages, state, note, _ = _run(h.regenerate(loaded, services, sampled))[-1]
    assert len(messages) == 2 and len(state.session.turns) == 1
    assert messages[1]["content"] == state.session.turns[-1].answer


def test_failed_regenerate_keeps_the_old_answer_in_the_chat(services, loaded):
    messages, *_ = _run(h.generate_report(loaded, services, GREEDY))[-1]
    too_long = dict(GREEDY, max_new_tokens=loaded.session.context_limit)  # cannot fit with any prompt
    after, state, note, download = _run(h.regenerate(loaded, services, too_long))[-1]
    assert note.startswith("⚠️") and after == messages and state.messages == messages
    assert after[-1]["content"] == state.session.turns[-1].answer and download


def test_regenerate_before_any_answer_is_a_notice(services, loaded):
    messages, _, note, _ = _run(h.regenerate(loaded, services, GREEDY))[-1]
    assert messages == [] and note.startswith("⚠️")


def test_stop_cancels_the_running_answer(services, loaded):
    stream = h.generate_report(loaded, services, dict(GREEDY, max_new_tokens=200))
    first = next(stream)
    h.stop(first[1])
    messages, state, note, _ = list(stream)[-1]
    assert state.session.turns[-1].cancelled and "stopped" in note.lower()
    assert messages[-1]["content"] == state.session.turns[-1].answer + h.STOPPED_MARK  # a cut answer says so
    assert f"**Answer:** {state.session.turns[-1].answer}{h.STOPPED_MARK}" in h.conversation_markdown(state)


def test_bad_questions_and_missing_image_are_notices(services, loaded):
    for question in ("   ", "x" * 5000):
        messages, state, note, _ = _run(h.ask(loaded, services, question, GREEDY))[-1]
        assert note.startswith("⚠️") and messages == [] and state.messages == []
    messages, _, note, _ = _run(h.ask(None, services, "Any effusion?", GREEDY))[-1]
    assert messages == [] and "Upload" in note


def test_dropped_turns_are_announced(services, loaded):
    _run(h.generate_report(loaded, services, GREEDY))
    first = loaded.session.turns[0]
    prompt_tokens = first.timings["prefilled_tokens"] + first.timings["reused_tokens"]
    # Room for the question alone but not for the history: the oldest turn must be dropped.
    budget = dict(GREEDY, max_new_tokens=loaded.session.context_limit - prompt_tokens)
    stream = h.ask(loaded, services, "Effusion?", budget)
    h.stop(next(stream)[1])
    *_, (messages, state, note, _) = stream
    assert state.session.turns[-1].dropped_turns >= 1
    assert "too long" in note and "stopped" in note.lower()


def test_new_image_during_an_answer_starts_clean(services, loaded, samples_dir):
    stream = h.generate_report(loaded, services, dict(GREEDY, max_new_tokens=200))
    next(stream)
    other = (samples_dir / "hannover_1479fa94_pa_640x755.png").read_bytes()
    state, _, description, note = h.load_image(loaded, other, services.config.image)
    assert state is loaded and note == "" and "640 × 755" in description
    assert list(stream) == []  # the old answer stops and writes nothing more
    assert state.messages == [] and state.session is None and state.image.size == (640, 755)
    messages, state, note, _ = _run(h.generate_report(state, services, GREEDY))[-1]
    assert len(messages) == 2 and len(state.session.turns) == 1


def test_clear_keeps_the_image(services, loaded):
    _run(h.generate_report(loaded, services, GREEDY))
    messages, state, note, download = h.clear_chat(loaded)
    assert messages == [] and state.session is None and state.image is not None and download == ""


def test_the_empty_chat_says_the_next_step(services, loaded):
    from xraygpt_app.web.services import Services

    assert h.chat_placeholder(False, services) == "Upload a radiograph, then press **Generate report**."
    _run(h.generate_report(loaded, services, GREEDY))
    _, state, _, _ = h.clear_chat(loaded)  # Clear keeps the image: the chat must not ask for an upload
    after_clear = h.chat_placeholder(state.image is not None, services)
    assert "Upload" not in after_clear and "Generate report" in after_clear
    assert "No chat model is loaded" in h.chat_placeholder(True, Services(config=services.config))


def test_vqa_answers_one_question_in_a_fresh_conversation(services, loaded):
    outputs = _run(h.vqa_answer(loaded, services, "Is the heart size normal?", GREEDY))
    answer, note = outputs[-1]
    assert note == "" and answer and loaded.session is None and loaded.messages == []


def test_zero_shot_preset_and_custom_labels(services, loaded):
    frame, rows, note = h.classify(loaded, services, "medclip-vit", "chexpert5", "")
    assert note == "" and len(rows) == 5
    probabilities = [row[1] for row in rows]
    assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 1e-3
    assert list(frame["label"]) == [row[0] for row in rows]
    frame, rows, note = h.classify(loaded, services, "medclip-vit", h.CUSTOM, "pneumonia,\n effusion, pneumonia")
    assert note == "" and sorted(row[0] for row in rows) == ["effusion", "pneumonia"]
    _, rows, note = h.classify(loaded, services, "medclip-vit", h.CUSTOM, "pneumonia")
    assert rows == [] and note.startswith("⚠️")
    _, rows, note = h.classify(loaded, services, "biomedclip", "chexpert5", "")
    assert rows == [] and note.startswith("⚠️")


def test_api_handlers(services, png_bytes):
    answer = ui_api.api_answer(services, png_bytes, "Any effusion?", GREEDY)
    assert isinstance(answer, str)
    scores = ui_api.api_classify(services, png_bytes, "medclip-vit", "covid", "")
    assert scores["labels"] == ["Normal", "COVID"] and scores["predicted"] in scores["labels"]


def test_missing_weights_do_not_stop_the_app(shared_dir, tmp_path, tiny_config):
    config = load_config(tiny_config, [f"weights.ckpt={tmp_path / 'absent.pth'}",
                                       f"zeroshot.models.medclip-vit.weights={tmp_path / 'absent.bin'}"])
    services = build_services(config, download=True)  # nothing to download from: still starts
    assert services.assistant is None and "absent.pth" in services.assistant_missing
    assert services.classifiers == {} and "absent.bin" in services.zeroshot_missing["medclip-vit"]
    note = _run(h.generate_report(h.UserState(), services, GREEDY))[-1][2]
    assert "absent.pth" in note

    from xraygpt_app.web.ui import build_app

    demo = build_app(services)  # builds, with the reasons shown in place of the controls
    page_text = str(demo.config)
    assert "XrayGPT is not available" in page_text and "absent.bin" in page_text


def test_app_exposes_the_api_names(services):
    from xraygpt_app.web.ui import build_app

    demo = build_app(services)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert {"report", "ask", "classify"} <= names


def test_the_buttons_that_ask_the_model_are_live_when_it_is_loaded(services):
    from xraygpt_app.web.ui import build_app

    props = [component.get("props", {}) for component in build_app(services).config["components"]]
    asking = {p["elem_id"]: p.get("interactive") for p in props if p.get("elem_id") in ("generate-report", "vqa-ask")}
    assert asking == {"generate-report": True, "vqa-ask": True}


def test_forgotten_session_lets_go_of_image_and_conversation(services, loaded):
    from xraygpt_app.web.ui import _forget_session

    _run(h.generate_report(loaded, services, GREEDY))
    assert loaded.session is not None and loaded.image is not None
    running = loaded.cancel  # what an answer still being written would be holding
    _forget_session(loaded)  # what Gradio calls when the session's state expires or the tab closes
    assert loaded.session is None and loaded.image is None and loaded.messages == []
    assert running.is_set()


def test_stop_pressed_while_queued_stops_the_answer_when_it_starts(services, loaded):
    loaded.arm()  # the request is submitted (before the queue) ...
    h.stop(loaded)  # ... and Stop is pressed while it waits
    messages, state, note, _ = _run(h.generate_report(loaded, services, GREEDY))[-1]
    assert state.session.turns[-1].cancelled and "stopped" in note.lower()
    loaded.arm()  # the next request starts clean: that Stop was spent
    _run(h.ask(loaded, services, "Any effusion?", GREEDY))
    assert not loaded.session.turns[-1].cancelled


def test_a_stop_with_nothing_running_does_not_cancel_the_next_request(services, loaded):
    h.stop(loaded)
    loaded.arm()
    _run(h.generate_report(loaded, services, GREEDY))
    assert not loaded.session.turns[-1].cancelled

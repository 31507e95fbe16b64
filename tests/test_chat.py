"""The chat engine on the tiny fixture model: streaming, KV reuse, cancellation, regenerate,
context budget, input checks, beams, and independent sessions."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from helpers import GREEDY

from xraygpt_app.api import Assistant
from xraygpt_app.errors import BadInputError, ModelMemoryError
from xraygpt_app.families.xraygpt.conversation import DEFAULT_REPORT_QUESTION, IMAGE_MESSAGE, SYSTEM_TEXT
from xraygpt_app.imaging.loader import load_radiograph

QUESTIONS = ("Could you provide a detailed description of the given x-ray image?",
             "Is there evidence of pleural effusion?",
             "Is the heart size normal?",
             "Any pneumothorax?",
             "What is the overall impression?")


@pytest.fixture(scope="module")
def model(tiny_assistant: Assistant) -> Assistant:
    return tiny_assistant


@pytest.fixture(scope="module")
def images(xraygpt_fixture_dir: Path, samples_dir: Path) -> list:
    cases = json.loads((xraygpt_fixture_dir / "expected.json").read_text(encoding="utf-8"))["cases"]
    return [load_radiograph(samples_dir / case["image"]).image for case in cases[:2]]


def _ids(session, questions, **generation) -> list[list[int]]:
    return [session.ask(q, **generation).token_ids for q in questions]


# --- streaming ---------------------------------------------------------------------------------

@pytest.mark.parametrize("generation", [GREEDY, {"do_sample": True, "seed": 7, "max_new_tokens": 16},
                                        {"do_sample": True, "seed": 11, "top_p": 0.5, "temperature": 1.5}])
def test_streamed_text_equals_non_streamed(model: Assistant, images: list, generation: dict) -> None:
    streamed, plain = model.chat(images[0]), model.chat(images[0])
    for question in QUESTIONS[:2]:
        pieces = list(streamed.ask_stream(question, **generation))
        result = plain.ask(question, **generation)
        assert len(pieces) > 1  # it really streams
        assert all(pieces)
        assert "".join(pieces) == streamed.turns[-1].answer == result.answer
        assert streamed.turns[-1].token_ids == result.token_ids


def test_sampling_is_seeded(model: Assistant, images: list) -> None:
    runs = [model.chat(images[0]).ask(QUESTIONS[0], do_sample=True, seed=s, max_new_tokens=16).token_ids
            for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# --- KV reuse ----------------------------------------------------------------------------------

def test_kv_reuse_equals_full_recompute_over_five_turns(model: Assistant, images: list) -> None:
    reuse, full = model.chat(images[1], reuse_kv=True), model.chat(images[1], reuse_kv=False)
    assert _ids(reuse, QUESTIONS, **GREEDY) == _ids(full, QUESTIONS, **GREEDY)
    assert [t.prompt for t in reuse.turns] == [t.prompt for t in full.turns]
    assert all(t.timings["reused_tokens"] > 0 for t in reuse.turns[1:])
    assert all(t.timings["reused_tokens"] == 0 for t in full.turns)


def test_kv_reuse_after_regenerate_and_beams(model: Assistant, images: list) -> None:
    """Regenerate and a beam turn change the cached prefix; greedy ids must still match a recompute."""
    outputs = []
    for reuse_kv in (True, False):
        session = model.chat(images[0], reuse_kv=reuse_kv)
        ids = _ids(session, QUESTIONS[:2], **GREEDY)
        list(session.regenerate(do_sample=True, seed=5, max_new_tokens=12))
        ids.append(session.turns[-1].token_ids)
        ids.append(session.ask(QUESTIONS[2], num_beams=2, **GREEDY).token_ids)
        ids += _ids(session, QUESTIONS[3:], **GREEDY)
        outputs.append(ids)
    assert outputs[0] == outputs[1]


# --- cancellation ------------------------------------------------------------------------------

def test_cancel_stops_early_and_marks_turn(model: Assistant, images: list) -> None:
    session, cancel = model.chat(images[0]), threading.Event()
    stream = session.ask_stream(QUESTIONS[0], cancel=cancel, do_sample=False, max_new_tokens=20)
    first = next(stream)
    cancel.set()
    rest = list(stream)
    turn = session.turns[-1]
    assert turn.cancelled
    assert 0 < len(turn.token_ids) < 20
    assert first + "".join(rest) == turn.answer
    follow_up = session.ask(QUESTIONS[1], **GREEDY)  # the session stays usable
    assert not follow_up.cancelled
    assert follow_up.token_ids


def test_cancel_from_another_thread(model: Assistant, images: list) -> None:
    """The answer streams on a worker thread; the test's own thread presses stop, as the UI's stop handler does."""
    session, cancel, streaming = model.chat(images[0]), threading.Event(), threading.Event()
    pieces: list[str] = []

    def consume() -> None:
        try:
            for piece in session.ask_stream(QUESTIONS[0], cancel=cancel, do_sample=False, max_new_tokens=1500):
                pieces.append(piece)
                if len(pieces) == 2:
                    streaming.set()
                    cancel.wait(timeout=60)  # a slow reader: the answer is mid-stream when stop arrives
        finally:
            streaming.set()  # an answer that ended early fails the is_alive check below instead of waiting

    worker = threading.Thread(target=consume)
    worker.start()
    assert streaming.wait(timeout=120)
    assert worker.is_alive()  # still inside ask_stream
    cancel.set()  # from this thread, not the worker
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert session.turns[-1].cancelled
    assert len(session.turns[-1].token_ids) < 1500


def test_cancel_before_start_generates_nothing(model: Assistant, images: list) -> None:
    session, cancel = model.chat(images[0]), threading.Event()
    cancel.set()
    assert list(session.ask_stream(QUESTIONS[0], cancel=cancel, **GREEDY)) == []
    assert session.turns[-1].cancelled
    assert session.turns[-1].token_ids == []


# --- regenerate ----------------------------------------------------------------------------------

def test_regenerate_replaces_last_turn(model: Assistant, images: list) -> None:
    session = model.chat(images[0])
    first = session.ask(QUESTIONS[0], **GREEDY)
    second = session.ask(QUESTIONS[1], **GREEDY)
    pieces = list(session.regenerate(**GREEDY))
    assert len(session.turns) == 2
    assert session.turns[0] is first
    again = session.turns[-1]
    assert again.question == QUESTIONS[1]
    assert again.prompt == second.prompt  # the old answer is not in the new prompt
    assert again.token_ids == second.token_ids
    assert "".join(pieces) == again.answer


def test_regenerated_answer_is_what_later_prompts_carry(model: Assistant, images: list) -> None:
    session = model.chat(images[0])
    old = session.ask(QUESTIONS[0], do_sample=True, seed=1).answer
    list(session.regenerate(do_sample=True, seed=2))
    new = session.turns[-1].answer
    later = session.ask(QUESTIONS[1], **GREEDY)
    assert f"Doctor: {new}###" in later.prompt
    if old != new:
        assert f"Doctor: {old}###" not in later.prompt


def test_regenerate_without_turns_is_bad_input(model: Assistant, images: list) -> None:
    with pytest.raises(BadInputError):
        list(model.chat(images[0]).regenerate())


def test_failed_regenerate_keeps_the_old_answer(model: Assistant, images: list) -> None:
    session = model.chat(images[0])
    first = session.ask(QUESTIONS[0], **GREEDY)
    with pytest.raises(BadInputError):  # these settings are refused before anything is generated
        list(session.regenerate(**{**GREEDY, "max_new_tokens": 4096}))
    assert session.turns == [first]
    assert f"Doctor: {first.answer}###" in session.ask(QUESTIONS[1], **GREEDY).prompt


# --- context budget ----------------------------------------------------------------------------

def test_context_budget_drops_oldest_turns(model: Assistant, images: list, tiny_config: Path) -> None:
    new_tokens = 12
    big = model.chat(images[0])
    _ids(big, QUESTIONS[:3], do_sample=False, max_new_tokens=new_tokens)
    third = big.turns[2].timings
    limit = third["reused_tokens"] + third["prefilled_tokens"] + new_tokens - 1  # turn 3 no longer fits
    small = Assistant.from_config(tiny_config, [f"llm.max_length={limit}"])
    outputs = []
    for reuse_kv in (True, False):
        session = small.chat(images[0], reuse_kv=reuse_kv)
        _ids(session, QUESTIONS[:3], do_sample=False, max_new_tokens=new_tokens)
        outputs.append([t.token_ids for t in session.turns])
    turns = session.turns
    assert [t.dropped_turns for t in turns[:2]] == [0, 0]
    assert [t.token_ids for t in turns[:2]] == [t.token_ids for t in big.turns[:2]]
    assert turns[2].dropped_turns > 0
    prompt = turns[2].prompt
    assert prompt.startswith(SYSTEM_TEXT)
    assert IMAGE_MESSAGE in prompt
    assert QUESTIONS[0] not in prompt
    assert QUESTIONS[2] in prompt
    assert outputs[0] == outputs[1]  # KV reuse stays exact when the kept prefix changes

    with pytest.raises(BadInputError, match="context"):
        small.chat(images[0]).ask("pleural effusion " * 100, do_sample=False, max_new_tokens=new_tokens)


# --- input checks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("question", ["", "   \n", "x" * 2001])
def test_empty_and_overlong_questions(model: Assistant, images: list, question: str) -> None:
    session = model.chat(images[0])
    with pytest.raises(BadInputError):
        session.ask(question, **GREEDY)
    assert session.turns == []


@pytest.mark.parametrize("generation", [{"top_k": 5}, {"num_beams": 0}, {"max_new_tokens": 0},
                                        {"temperature": 0.0}, {"top_p": 1.5}])
def test_bad_generation_settings(model: Assistant, images: list, generation: dict) -> None:
    with pytest.raises(BadInputError):
        model.chat(images[0]).ask(QUESTIONS[0], **generation)


# --- beams and sessions ------------------------------------------------------------------------------

def test_beam_search_answers(model: Assistant, images: list) -> None:
    session = model.chat(images[0])
    pieces = list(session.ask_stream(QUESTIONS[0], num_beams=2, do_sample=False, max_new_tokens=10))
    turn = session.turns[-1]
    assert 0 < len(turn.token_ids) <= 10
    assert isinstance(turn.answer, str)
    assert "".join(pieces) == turn.answer
    again = model.chat(images[0]).ask(QUESTIONS[0], num_beams=2, do_sample=False, max_new_tokens=10)
    assert again.token_ids == turn.token_ids


def test_stop_ends_beam_search(model: Assistant, images: list) -> None:
    stop = threading.Event()
    stop.set()  # already pressed: generate must stop after its first step
    session = model.chat(images[0])
    list(session.ask_stream(QUESTIONS[0], cancel=stop, num_beams=2, do_sample=False, max_new_tokens=50, min_length=50))
    turn = session.turns[-1]
    assert turn.cancelled
    assert len(turn.token_ids) == 1


def test_out_of_memory_leaves_the_conversation_as_it_was(model: Assistant, images: list, monkeypatch) -> None:
    session = model.chat(images[0])
    first = session.ask(QUESTIONS[0], **GREEDY)

    def exhausted(**inputs):  # fault injection: the device runs out of memory in the prefill
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(session, "_forward", exhausted)
    with pytest.raises(ModelMemoryError):
        session.ask(QUESTIONS[1], **GREEDY)
    assert session.turns == [first]
    monkeypatch.undo()
    again = session.ask(QUESTIONS[1], **GREEDY)  # starts from an empty cache, same answer as a fresh recompute
    fresh = model.chat(images[0], reuse_kv=False)
    fresh.ask(QUESTIONS[0], **GREEDY)
    assert again.token_ids == fresh.ask(QUESTIONS[1], **GREEDY).token_ids


def test_sessions_do_not_affect_each_other(model: Assistant, images: list) -> None:
    alone = _ids(model.chat(images[0]), QUESTIONS[:3], **GREEDY)
    a, b = model.chat(images[0]), model.chat(images[1])
    interleaved = []
    for question in QUESTIONS[:3]:
        interleaved.append(a.ask(question, **GREEDY).token_ids)
        b.ask(question[::-1], do_sample=True, seed=3, max_new_tokens=12)
    assert interleaved == alone
    assert len(b.turns) == 3
    assert all(QUESTIONS[0] not in t.prompt for t in b.turns)


def test_report_uses_xraygpt_default_question(model: Assistant, images: list) -> None:
    result = model.report(images[0], do_sample=False, max_new_tokens=4)
    assert result.question == DEFAULT_REPORT_QUESTION
    assert result.prompt.endswith(f"{IMAGE_MESSAGE} {DEFAULT_REPORT_QUESTION}###Doctor:")
    assert result.prompt.startswith(SYSTEM_TEXT + "###Patient: ")

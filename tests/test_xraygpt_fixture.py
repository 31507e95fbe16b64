"""The tiny Assistant fixture, loaded through the production path, reproduces XrayGPT's own outputs.

``../shared/fixtures/xraygpt_tiny/expected.json`` and ``expected_tensors.pt`` were produced by
Assistant's code (greedy, 20 new tokens, two turns per image); the tolerances are its README's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xraygpt_app.api import Assistant
from xraygpt_app.imaging.loader import load_radiograph

TENSORS = {  # ImageEncoding field -> key suffix in expected_tensors.pt
    "pixel_values": "pixel_values",
    "vit_after_ln_vision": "vit_ln",
    "qformer_last_hidden_state": "qformer",
    "llama_proj_output": "llama_inputs",
}


@pytest.fixture(scope="module")
def expected(xraygpt_fixture_dir: Path) -> dict:
    return json.loads((xraygpt_fixture_dir / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def expected_tensors(xraygpt_fixture_dir: Path) -> dict:
    return torch.load(xraygpt_fixture_dir / "expected_tensors.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(tiny_assistant: Assistant) -> Assistant:
    return tiny_assistant


@pytest.fixture(scope="module")
def conversations(model: Assistant, expected: dict, samples_dir: Path) -> list:
    """One two-turn greedy conversation per fixture case, run once for the whole module."""
    out = []
    for case in expected["cases"]:
        image = load_radiograph(samples_dir / case["image"]).image
        session = model.chat(image)
        results = [session.ask(turn["question"], do_sample=False, max_new_tokens=expected["generation"]
                               ["max_new_tokens"]) for turn in case["turns"]]
        out.append((session, results))
    return out


def _cases(count: int = 3) -> list[int]:
    return list(range(count))


def test_fixture_has_three_cases_of_two_turns(expected: dict) -> None:
    assert len(expected["cases"]) == 3
    assert all(len(case["turns"]) == 2 for case in expected["cases"])


def test_config_dims_match_fixture(model: Assistant, expected: dict) -> None:
    dims = expected["dims"]
    assert model.config.vision.embed_dim == dims["vision"]["embed_dim"]
    assert model.config.vision.depth == dims["vision"]["depth"]
    assert model.config.qformer.num_query_tokens == dims["qformer"]["num_query_tokens"]
    assert model.model.llm.config.hidden_size == dims["llm"]["hidden_size"]
    assert model.model.llm.config.num_hidden_layers == dims["llm"]["num_hidden_layers"]


@pytest.mark.parametrize("index", _cases())
def test_image_encoding_matches_reference(index: int, conversations: list, expected_tensors: dict) -> None:
    encoding = conversations[index][0].encoding
    for field, key in TENSORS.items():
        ours = getattr(encoding, field).detach().float().cpu()
        torch.testing.assert_close(ours, expected_tensors[f"{index}.{key}"].float(), atol=1e-4, rtol=1e-4,
                                   msg=lambda m, f=field: f"{f}: {m}")


@pytest.mark.parametrize("index", _cases())
def test_tensor_statistics_match_json(index: int, conversations: list, expected: dict) -> None:
    """The JSON's shapes and first values agree too (guards against comparing the wrong file)."""
    encoding = conversations[index][0].encoding
    for field in TENSORS:
        stats = expected["cases"][index][field]
        tensor = getattr(encoding, field).detach().float().cpu()
        assert list(tensor.shape) == stats["shape"]
        torch.testing.assert_close(tensor.flatten()[:8], torch.tensor(stats["first8"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("index", _cases())
def test_prompts_exact(index: int, conversations: list, expected: dict) -> None:
    results = conversations[index][1]
    for result, turn in zip(results, expected["cases"][index]["turns"], strict=True):
        assert result.question == turn["question"]
        assert result.prompt == turn["prompt"]


@pytest.mark.parametrize("index", _cases())
def test_prompt_segment_ids_exact(index: int, model: Assistant, conversations: list, expected: dict) -> None:
    """The ids the engine fed (BOS only on the first segment); the prefill length agrees with them."""
    queries = model.config.qformer.num_query_tokens
    for result, turn in zip(conversations[index][1], expected["cases"][index]["turns"], strict=True):
        segments = result.prompt_segment_ids
        assert segments == turn["prompt_segment_ids"]
        fed = result.timings["reused_tokens"] + result.timings["prefilled_tokens"]
        assert fed == len(segments[0]) + queries + len(segments[1])


@pytest.mark.parametrize("index", _cases())
def test_generated_ids_and_answers_exact(index: int, conversations: list, expected: dict) -> None:
    for result, turn in zip(conversations[index][1], expected["cases"][index]["turns"], strict=True):
        assert result.token_ids == turn["generated_ids"]
        assert result.answer == turn["answer"]
        assert not result.cancelled
        assert result.dropped_turns == 0


@pytest.mark.parametrize("index", _cases())
def test_second_turn_reuses_kv_cache(index: int, conversations: list) -> None:
    first, second = conversations[index][1]
    assert first.timings["reused_tokens"] == 0
    assert second.timings["reused_tokens"] > 0
    # At least system text + image + first question are shared; only the new text is prefilled.
    assert second.timings["prefilled_tokens"] < second.timings["reused_tokens"]


def test_image_encoded_once_per_session(model: Assistant, expected: dict, samples_dir: Path) -> None:
    """A follow-up never re-runs the vision tower: one ViT forward per upload."""
    calls = []
    handle = model.model.vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        image = load_radiograph(samples_dir / expected["cases"][0]["image"]).image
        session = model.chat(image)
        for question in ("First question?", "Second question?", "Third question?"):
            session.ask(question, do_sample=False, max_new_tokens=2)
    finally:
        handle.remove()
    assert len(calls) == 1

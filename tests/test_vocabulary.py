"""Vocabulary mismatches between an LLM folder and its tokenizer never crash.

Padded vocabularies (more embedding rows than tokens) must never produce an id the tokenizer
cannot decode; a tokenizer with more tokens than the embedding is refused at load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tinymodels
import torch
from helpers import greedy

from xraygpt_app.api import Assistant
from xraygpt_app.checkpoints import CheckpointKeyError
from xraygpt_app.cli import main
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.llm import load_tokenizer, make_decoder

GREEDY = greedy(8, min_length=8)
QUESTIONS = ("Describe the image.", "Any effusion?")
IMAGE = Path(__file__).resolve().parents[1] / "examples" / "nih_cxr14_00000001_000_pa_512.png"
PIECES = tinymodels.TinyDims().llm_vocab  # the fixture tokenizer's 1000 pieces


@pytest.fixture(scope="module")
def image():
    return load_radiograph(IMAGE).image


@pytest.fixture(scope="module")
def base(tiny_xraygpt, image) -> tuple[Assistant, list[list[int]]]:
    model = Assistant.from_config(tiny_xraygpt.config)
    chat = model.chat(image)
    return model, [chat.ask(q, **GREEDY).token_ids for q in QUESTIONS]


def _load_with_llm(tiny, llm, name: str) -> Assistant:
    folder = tinymodels.save_llama_safetensors(llm, tiny.root / name)
    return Assistant.from_config(tiny.config, overrides=[f"weights.llama_model={folder}"])


def test_padded_vocabulary_never_generates_padding_ids(tiny_xraygpt, base, image) -> None:
    """Padding rows that would win every argmax are masked: the answers equal the unpadded model's."""
    model, expected = base
    lm_head = tiny_xraygpt.llm.lm_head.weight.detach()
    winners = sorted({t for turn in expected for t in turn})
    padded = _load_with_llm(tiny_xraygpt, tinymodels.with_vocabulary(
        tiny_xraygpt.llm, PIECES + 64, extra_rows=3 * lm_head[winners]), "vicuna_padded")
    assert padded.model.suppressed_ids == list(range(PIECES, PIECES + 64))
    chat = padded.chat(image)
    with torch.inference_mode():  # unmasked, the first step would pick a padding row
        first = padded.model.llm(inputs_embeds=chat._prepare(QUESTIONS[0], 8).embeds).logits[0, -1]
    assert int(first.argmax()) >= PIECES
    assert [chat.ask(q, **GREEDY).token_ids for q in QUESTIONS] == expected
    beams = padded.chat(image).ask(QUESTIONS[0], num_beams=2, **GREEDY).token_ids
    assert beams
    assert max(beams) < PIECES
    sampled = padded.chat(image).ask(QUESTIONS[0], do_sample=True, seed=3, max_new_tokens=8, min_length=8)
    assert max(sampled.token_ids) < PIECES


def test_tokenizer_larger_than_embedding_is_refused(tiny_xraygpt) -> None:
    with pytest.raises(CheckpointKeyError, match=rf"{PIECES} tokens but the LLM's embedding has only 990 rows"):
        _load_with_llm(tiny_xraygpt, tinymodels.with_vocabulary(tiny_xraygpt.llm, 990), "vicuna_cropped")


def test_cli_says_so_without_a_traceback(tiny_xraygpt, capsys) -> None:
    folder = tiny_xraygpt.root / "vicuna_cropped_cli"
    tinymodels.save_llama_safetensors(tinymodels.with_vocabulary(tiny_xraygpt.llm, 990), folder)
    code = main(["report", str(IMAGE), "-c", str(tiny_xraygpt.config), "--set", f"weights.llama_model={folder}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not belong to these weights" in err
    assert "Traceback" not in err


def test_decoder_splices_added_tokens_and_drops_unknown_ids(xraygpt_fixture_dir: Path) -> None:
    folder = xraygpt_fixture_dir / "vicuna_tiny"
    reference = make_decoder(folder, load_tokenizer(folder))
    tokenizer = load_tokenizer(folder)
    tokenizer.add_tokens(["<extra_pad>"])  # id 1000, beyond the SentencePiece model (a padded LLaMA's pad)
    decode = make_decoder(folder, tokenizer)
    assert decode([450, 871, 600, 5000]) == reference([450, 871, 600]) != ""
    assert decode([450, 1000]) == " " + reference([450]) + "<extra_pad>"

"""Stop-token sequences for ``###`` derived from the tokenizer, for several kinds of tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from xraygpt_app.llm import load_tokenizer, stop_token_sequences

REPORT_LINES = [
    "###Patient: Describe the given chest x-ray image in detail.###Doctor: The lungs are clear.",
    "The cardiomediastinal silhouette is within normal limits. ###",
    "No focal consolidation, pleural effusion or pneumothorax. ### Impression: no acute disease.",
    "Heart size is normal. The lungs are clear. ###Doctor: There is no pneumothorax.###",
    "Mild cardiomegaly. Small left pleural effusion. ### Findings: degenerative changes of the spine.",
]
CONTEXTS = ("", "clear.", "clear. ", "effusion\n", "no pneumothorax")


def _byte_level_bpe(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained on ``lines`` (every byte is in the base alphabet)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(lines * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def fixture_tokenizer(xraygpt_fixture_dir: Path):
    return load_tokenizer(xraygpt_fixture_dir / "vicuna_tiny")


@pytest.fixture(scope="module")
def gpt2_style() -> PreTrainedTokenizerFast:
    return _byte_level_bpe(REPORT_LINES, vocab_size=400)


@pytest.fixture(scope="module")
def hash_only_as_bytes() -> PreTrainedTokenizerFast:
    lines = [line.replace("#", "") for line in REPORT_LINES]  # '#' never seen: no '##' merges
    return _byte_level_bpe(lines, vocab_size=330)


def _check_decodes(tokenizer, sequences: list[list[int]], stop: str = "###") -> None:
    assert sequences
    for seq in sequences:
        text = tokenizer.decode(seq)
        assert text == stop or (text.startswith(" ") and text[1:] == stop), (seq, text)


def _check_encodings_caught(tokenizer, sequences: list[list[int]], stop: str = "###") -> None:
    """Wherever the tokenizer writes the stop string as tokens of its own, those tokens are a sequence.

    (A piece that merges the stop string with text before it, like '.###', is not a stop in the
    reference either; such contexts are skipped.)
    """
    clean = 0
    for context in CONTEXTS:
        head = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        ids = tokenizer(context + stop, add_special_tokens=False)["input_ids"]
        if ids[:len(head)] != head:
            continue
        clean += 1
        assert ids[len(head):] in sequences, (context, tokenizer.convert_ids_to_tokens(ids))
    assert clean >= 2


def test_fixture_tokenizer_finds_reference_stop_ids(fixture_tokenizer, expected_stops) -> None:
    sequences = stop_token_sequences(fixture_tokenizer, "###")
    assert [285] in sequences
    assert [310] in sequences
    assert all(s in sequences for s in expected_stops)
    assert sequences[:2] == [[285], [310]]  # shortest first
    assert len({tuple(s) for s in sequences}) == len(sequences)
    _check_decodes(fixture_tokenizer, sequences)
    _check_encodings_caught(fixture_tokenizer, sequences)


@pytest.fixture(scope="module")
def expected_stops(xraygpt_fixture_dir: Path) -> list[list[int]]:
    expected = json.loads((xraygpt_fixture_dir / "expected.json").read_text(encoding="utf-8"))
    return expected["stop_sequences_for_this_tokenizer"]


def test_fixture_tokenizer_includes_byte_fallback_spellings(fixture_tokenizer) -> None:
    sequences = stop_token_sequences(fixture_tokenizer, "###")
    hash_byte = fixture_tokenizer.convert_tokens_to_ids("<0x23>")
    assert [hash_byte] * 3 in sequences


def test_byte_level_bpe(gpt2_style: PreTrainedTokenizerFast) -> None:
    vocab = gpt2_style.get_vocab()
    assert "###" in vocab
    assert "\u0120###" in vocab  # trained merges: '###' and 'Ġ###'
    sequences = stop_token_sequences(gpt2_style, "###")
    assert [vocab["###"]] in sequences
    assert [vocab["\u0120###"]] in sequences
    assert [vocab["#"]] * 3 in sequences
    _check_decodes(gpt2_style, sequences)
    _check_encodings_caught(gpt2_style, sequences)


def test_tokenizer_with_single_hash_pieces_only(hash_only_as_bytes: PreTrainedTokenizerFast) -> None:
    vocab = hash_only_as_bytes.get_vocab()
    assert "#" in vocab
    assert not any("##" in token for token in vocab)
    sequences = stop_token_sequences(hash_only_as_bytes, "###")
    assert sequences == [[vocab["#"]] * 3] or [vocab["#"]] * 3 in sequences
    assert all(len(s) == 3 for s in sequences if vocab.get("\u0120#") not in s)
    _check_decodes(hash_only_as_bytes, sequences)
    _check_encodings_caught(hash_only_as_bytes, sequences)


def test_word_start_marker_only_on_first_piece(gpt2_style: PreTrainedTokenizerFast) -> None:
    """' #' + ' ##' would decode to ' # ##', not '###': a space marker is allowed only first."""
    vocab = gpt2_style.get_vocab()
    spaced = {i for t, i in vocab.items() if t.startswith("\u0120")}
    for seq in stop_token_sequences(gpt2_style, "###"):
        assert not spaced.intersection(seq[1:])


def test_other_stop_string(fixture_tokenizer) -> None:
    sequences = stop_token_sequences(fixture_tokenizer, "Patient:")
    _check_decodes(fixture_tokenizer, sequences, stop="Patient:")
    ids = fixture_tokenizer("###Patient:", add_special_tokens=False)["input_ids"]
    assert any(ids[-len(s):] == s for s in sequences)

"""Generation settings, XrayGPT's sampling rules, and stop detection.

XrayGPT calls ``generate(inputs_embeds=...)`` with transformers 4.29, where the running
``input_ids`` start empty: the repetition penalty and ``min_length`` therefore see only the
generated tokens, and sampling uses the library default ``top_k=50`` before ``top_p``. We apply
the same transformers processors, in the same order, token by token.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .config import GenerationConfig
from .errors import BadInputError

TUNABLE = ("max_new_tokens", "num_beams", "do_sample", "top_p", "temperature", "repetition_penalty",
           "length_penalty", "min_length", "seed")
HF_DEFAULT_TOP_K = 50  # transformers' GenerationConfig default, which XrayGPT's sampling uses


def settings_with(base: GenerationConfig, **overrides) -> GenerationConfig:
    """A copy of ``base`` with per-request values; unknown names and bad ranges are user errors."""
    unknown = sorted(set(overrides) - set(TUNABLE))
    if unknown:
        raise BadInputError(f"Unknown generation setting(s): {', '.join(unknown)}")
    settings = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    if not 1 <= settings.max_new_tokens <= 4096:
        raise BadInputError("max_new_tokens must be between 1 and 4096")
    if not 1 <= settings.num_beams <= 10:
        raise BadInputError("num_beams must be between 1 and 10")
    if not 0 < settings.top_p <= 1 or not 0 < settings.temperature <= 5:
        raise BadInputError("top_p must be in (0, 1] and temperature in (0, 5]")
    return settings


def logits_processors(settings: GenerationConfig, eos_token_id: int | None,
                      suppressed_ids: list[int] = ()) -> LogitsProcessorList:
    """Processors (always) then warpers (sampling only), as transformers 4.29 orders them.

    ``suppressed_ids`` (ids the tokenizer cannot decode) are masked first, so no later step can pick them.
    """
    processors = LogitsProcessorList()
    if suppressed_ids:
        processors.append(SuppressTokensLogitsProcessor(suppressed_ids))
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.min_length > 0 and eos_token_id is not None:
        processors.append(MinLengthLogitsProcessor(settings.min_length, eos_token_id))
    if settings.do_sample:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        processors.append(TopKLogitsWarper(HF_DEFAULT_TOP_K))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def next_token(logits: torch.Tensor, generated: torch.Tensor, processors: LogitsProcessorList,
               settings: GenerationConfig, generator: torch.Generator | None) -> int:
    """Pick the next token from the last position's logits (greedy or sampled)."""
    scores = processors(generated, logits.float())
    if not settings.do_sample:
        return int(scores.argmax(dim=-1))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def ends_with_any(ids: list[int], sequences: list[list[int]]) -> bool:
    return any(len(ids) >= len(seq) and ids[-len(seq):] == seq for seq in sequences)


class StopOnSequences(StoppingCriteria):
    """For ``generate`` (beam search): stop when a sequence ends with a stop-token sequence."""

    def __init__(self, sequences: list[list[int]]):
        self.sequences = sequences

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = [ends_with_any(row.tolist(), self.sequences) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class StopOnEvent(StoppingCriteria):
    """For ``generate``: stop every sequence once ``event`` is set (the user pressed Stop)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

"""The chat engine: one conversation per image, streamed answers, KV reuse, context budget.

Better than the reference in three ways, with the same answers:
- the image is encoded once per upload, and a follow-up reuses the KV cache for the longest
  unchanged prefix of the prompt (system text, image, earlier turns), prefilling only the rest;
- answers stream token by token and can be cancelled;
- when the conversation outgrows the context, the oldest turns are dropped (never the system
  text or the image) and the caller is told, instead of the reference's silent front crop.

With ``runtime.llm_backend: vllm`` only the token source changes: the same prompt embeddings go to
a vLLM server (``remote_llm``), whose prefix cache does the reuse, and the same stop rules and
clean-up apply to the token ids that stream back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import BadInputError, ModelMemoryError
from .families import ChatModel, ImageEmbedding, Turn
from .generation import StopOnEvent, StopOnSequences, ends_with_any, logits_processors, next_token, settings_with
from .kvcache import new_kv_cache
from .serving.remote import RemoteLLM, remote_tokens

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 2000


@dataclass
class TurnResult:
    question: str
    prompt: str
    token_ids: list[int]
    answer: str
    timings: dict[str, float] = field(default_factory=dict)
    dropped_turns: int = 0
    cancelled: bool = False
    prompt_segment_ids: list[list[int]] = field(default_factory=list)  # text tokens before/after the image

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _PreparedPrompt:
    text: str
    ids: list[int]  # image positions are negative markers, so they never match text tokens
    embeds: torch.Tensor
    dropped: int
    segment_ids: list[list[int]]


class ChatSession:
    """A conversation about one image. Not shared between users; not thread-safe by design."""

    def __init__(self, model: ChatModel, encoding: ImageEmbedding, reuse_kv: bool = True):
        self.model, self.encoding = model, encoding
        self.reuse_kv = reuse_kv  # False re-runs the whole prompt every turn, as the reference does
        self.turns: list[TurnResult] = []
        self._history: list[Turn] = []  # stored answers, as later prompts carry them
        self._remote = model.llm if isinstance(model.llm, RemoteLLM) else None  # the LLM runs on a vLLM server
        self._kv = None if self._remote else new_kv_cache(model.llm, model.config.runtime.compile,
                                                          model.context_length)
        self._cached_ids: list[int] = []
        self._stops = model.stop_sequences()

    def ask(self, question: str, **generation) -> TurnResult:
        """Answer ``question`` and return the finished turn."""
        for _ in self.ask_stream(question, **generation):
            pass
        return self.turns[-1]

    def ask_stream(self, question: str, *, cancel: threading.Event | None = None, **generation) -> Iterator[str]:
        """Yield the answer in pieces; afterwards ``turns[-1]`` holds the finished turn."""
        question = check_question(question)
        settings = settings_with(self.model.config.generation, **generation)
        prompt = self._prepare(question, settings.max_new_tokens)
        try:
            if settings.num_beams > 1 and self._remote is None:
                yield from self._beam_search(question, prompt, settings, cancel)
            else:
                yield from self._decode(question, prompt, settings, cancel)
        except torch.OutOfMemoryError:
            if self._kv is not None:
                self._kv.clear()  # a forward may have stopped half-way through the cache
            self._cached_ids = []
            if self.model.placement.llm_device.type == "cuda":
                torch.cuda.empty_cache()
            raise ModelMemoryError("The model ran out of memory on this answer. Try fewer new tokens or beams, or"
                                   " Clear to start a shorter conversation.") from None

    def regenerate(self, *, cancel: threading.Event | None = None, **generation) -> Iterator[str]:
        """Drop the last answer and answer its question again."""
        if not self.turns:
            raise BadInputError("There is no answer to regenerate yet.")
        last, stored = self.turns.pop(), self._history.pop()
        try:
            yield from self.ask_stream(last.question, cancel=cancel, **generation)
        except BadInputError:  # e.g. new settings that no longer fit: keep the old answer
            self.turns.append(last)
            self._history.append(stored)
            raise

    @property
    def context_limit(self) -> int:
        return self.model.context_length

    def _prepare(self, question: str, max_new_tokens: int) -> _PreparedPrompt:
        """Render and embed the prompt, dropping the oldest turns until it fits."""
        image_ids = [-1 - i for i in range(self.encoding.llm_embeds.shape[1])]
        for dropped in range(len(self._history) + 1):
            segments = self.model.render_prompt(self._history[dropped:], question)
            ids = segments.before + image_ids + segments.after
            if len(ids) + max_new_tokens <= self.context_limit:
                embeds = torch.cat([self.model.embed_ids(segments.before), self.encoding.llm_embeds,
                                    self.model.embed_ids(segments.after)], dim=1)
                return _PreparedPrompt(segments.text, ids, embeds, dropped, [segments.before, segments.after])
        raise BadInputError(
            f"The question and answer length do not fit the model's context of {self.context_limit} tokens"
            f" ({len(ids)} prompt tokens + {max_new_tokens} new): shorten the question or lower max_new_tokens.")

    def _decode(self, question: str, prompt: _PreparedPrompt, settings, cancel) -> Iterator[str]:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        tokens = (self._remote_tokens(prompt, settings, timings) if self._remote is not None
                  else self._local_tokens(prompt, settings, timings))
        generated: list[int] = []
        emitted, cancelled = "", False
        try:
            while not (cancelled := cancel is not None and cancel.is_set()):
                token = next(tokens, None)
                if token is None:  # the server ended the answer (its max_tokens or EOS)
                    break
                generated.append(token)
                if len(generated) == 1:  # picking the token waits for the device, so this is the real TTFT
                    timings["time_to_first_token_s"] = time.perf_counter() - started
                if self._finished(generated) or len(generated) >= settings.max_new_tokens:
                    break
                piece = self._stable_text(self.model.answer_text(generated))[len(emitted):]
                if piece:
                    emitted += piece
                    yield piece
        finally:
            tokens.close()  # a remote answer's connection closes: the server aborts the request
        if self._remote is None:  # what the cache now holds: the prompt and every generated token fed back
            self._cached_ids = (prompt.ids + generated)[: self._kv.length()]
        ttft = timings.setdefault("time_to_first_token_s", time.perf_counter() - started)
        timings.update(prefill_s=ttft, decode_s=time.perf_counter() - started - ttft, new_tokens=len(generated))
        answer = self._finish_turn(question, prompt, generated, cancelled, timings)
        if answer.startswith(emitted) and answer != emitted:
            yield answer[len(emitted):]

    @torch.inference_mode()
    def _local_tokens(self, prompt: _PreparedPrompt, settings, timings: dict) -> Iterator[int]:
        """The in-process LLM's tokens: prefill after the reused prefix, then one forward per token."""
        reused = self._reuse_cache(prompt.ids)
        logits = self._forward(inputs_embeds=prompt.embeds[:, reused:])
        timings.update(reused_tokens=reused, prefilled_tokens=len(prompt.ids) - reused)
        generator = None
        if settings.seed is not None:  # on the logits' device, as multinomial requires
            generator = torch.Generator(device=logits.device).manual_seed(settings.seed)
        processors = logits_processors(settings, self.model.tokenizer.eos_token_id, self.model.suppressed_ids)
        generated: list[int] = []
        while True:
            history = torch.tensor([generated], dtype=torch.long, device=logits.device)
            generated.append(next_token(logits[:, -1], history, processors, settings, generator))
            yield generated[-1]
            logits = self._forward(input_ids=torch.tensor([generated[-1:]], device=logits.device))

    def _remote_tokens(self, prompt: _PreparedPrompt, settings, timings: dict) -> Iterator[int]:
        """The vLLM server's tokens for the same prompt embeddings (its prefix cache reuses earlier turns).

        Single-token stops go to the server, so it ends the answer itself, unless ``min_length`` is set:
        vLLM's min_tokens would then hold back those ids too, where transformers holds back EOS only.
        Longer stop sequences are found here, as in process, and end the request.
        """
        singles = [seq[0] for seq in self._stops if len(seq) == 1] if settings.min_length == 0 else []
        suppressed = self.model.suppressed_ids
        return remote_tokens(self._remote, prompt.embeds[0], settings, singles,
                             suppressed[0] if suppressed else None, timings)

    def _beam_search(self, question: str, prompt: _PreparedPrompt, settings, cancel) -> Iterator[str]:
        """Beams go through ``generate`` (no streaming, no KV reuse), as the reference does."""
        started = time.perf_counter()
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with torch.inference_mode():
            out = self.model.llm.generate(
                inputs_embeds=prompt.embeds, attention_mask=torch.ones(prompt.embeds.shape[:2], dtype=torch.long,
                                                                       device=prompt.embeds.device),
                max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams, do_sample=settings.do_sample,
                top_p=settings.top_p, temperature=settings.temperature, min_length=settings.min_length,
                repetition_penalty=settings.repetition_penalty, length_penalty=settings.length_penalty,
                stopping_criteria=[StopOnSequences(self._stops), *([StopOnEvent(cancel)] if cancel else [])],
                pad_token_id=self.model.tokenizer.pad_token_id, suppress_tokens=self.model.suppressed_ids or None)
        self._kv.clear()
        self._cached_ids = []
        generated = out[0].tolist()
        yield self._finish_turn(question, prompt, generated, bool(cancel and cancel.is_set()),
                                {"generate_s": time.perf_counter() - started, "new_tokens": len(generated)})

    def _reuse_cache(self, ids: list[int]) -> int:
        """Crop the KV cache to the longest prefix shared with ``ids``; return its length."""
        shared = 0
        for old, new in zip(self._cached_ids, ids, strict=False):
            if old != new:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)  # at least one position must run to get logits
        if self._kv.cache is None or shared == 0 or not self.reuse_kv:
            self._kv.restart()
            return 0
        self._kv.crop(shared)
        return shared

    def _forward(self, **inputs) -> torch.Tensor:
        return self._kv.forward(**inputs)

    def _finished(self, generated: list[int]) -> bool:
        eos = self.model.tokenizer.eos_token_id
        return generated[-1] == eos or ends_with_any(generated, self._stops)

    def _finish_turn(self, question: str, prompt: _PreparedPrompt, generated: list[int], cancelled: bool,
                     timings: dict[str, float]) -> str:
        stored = self.model.answer_text(generated)
        self._history.append(Turn(question, stored))
        result = TurnResult(question=question, prompt=prompt.text, token_ids=generated,
                            answer=self.model.display_answer(stored), timings=timings, dropped_turns=prompt.dropped,
                            cancelled=cancelled, prompt_segment_ids=prompt.segment_ids)
        self.turns.append(result)
        log.info("turn %d: %d new tokens, %d reused, %.2f s", len(self.turns), len(generated),
                 timings.get("reused_tokens", 0), sum(v for k, v in timings.items() if k.endswith("_s")))
        return result.answer

    def _stable_text(self, text: str) -> str:
        """The display text minus any tail that a later token could still change."""
        text = self.model.display_answer(text)
        for suffix in self.model.pending_suffixes:
            for n in range(len(suffix), 0, -1):
                if text.endswith(suffix[:n]):
                    text = text[: len(text) - n]
                    break
        return text


def check_question(question: str) -> str:
    """The question as the prompt will carry it, or a BadInputError saying what is wrong."""
    if not isinstance(question, str) or not question.strip():
        raise BadInputError("Please type a question.")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadInputError(f"The question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}.")
    return question  # kept verbatim: the reference puts it into the prompt as typed

"""The chat engine's KV cache: transformers' dynamic cache, or a static one with a compiled decode step.

``runtime.compile: true`` swaps the default ``DynamicCache`` (grows token by token) for a
``StaticCache`` of the whole context and runs each one-token decode step through ``torch.compile``
(``mode="reduce-overhead"``, i.e. CUDA graphs, on a GPU). Prefills stay eager: their length
varies. Both keep the conversation's cache between turns, so a follow-up reuses the shared prefix.
The compiled step is built once per LLM; each conversation has its own static cache (the full
context's keys and values from its first turn), so on a GPU each new conversation may record its
own CUDA graph: the option suits one conversation at a time (CLI, API, a single-user app).
"""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache, StaticCache

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # llm -> its compiled decode step
CPU_BACKEND = "inductor"  # torch.compile's backend on the CPU (its C++ build takes minutes on a small machine)


class DynamicKV:
    """The default: a ``DynamicCache`` that grows with the conversation and is cropped to a shared prefix."""

    def __init__(self, llm: torch.nn.Module):
        self.llm = llm
        self.cache: DynamicCache | None = None

    def restart(self) -> None:
        """Start empty (a new conversation, or nothing of the old one is reusable)."""
        self.cache = DynamicCache(config=self.llm.config)

    def clear(self) -> None:
        """Free the cache (after an out-of-memory error or a beam-search turn); the next turn restarts it."""
        self.cache = None

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        self.cache.crop(length - self.cache.get_seq_length())  # a negative count removes from the end

    def length(self) -> int:
        """Positions the cache holds."""
        return 0 if self.cache is None else self.cache.get_seq_length()

    def forward(self, **inputs) -> torch.Tensor:
        """Run the LLM on ``inputs`` after the cached positions; the last position's logits."""
        # Only the last position's logits are used: skipping the rest saves a prompt-length x
        # vocabulary matmul and its memory in every prefill.
        return self.llm(**inputs, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits


class StaticKV(DynamicKV):
    """A ``StaticCache`` of ``max_len`` positions; one-token steps go through ``step`` (the compiled LLM).

    The cache's length is ours to keep: cropping only moves it back, and the causal mask hides whatever
    stale keys lie beyond it until the next tokens overwrite them.
    """

    def __init__(self, llm: torch.nn.Module, step, max_len: int):
        super().__init__(llm)
        self.step, self.max_len, self._length = step, max_len, 0

    def restart(self) -> None:
        if self.cache is None:
            self.cache = StaticCache(config=self.llm.config, max_cache_len=self.max_len)
        else:
            self.cache.reset()
        self._length = 0

    def crop(self, length: int) -> None:
        self._length = length
        for layer in self.cache.layers:  # transformers >= 5.20 counts positions itself; older ones use cache_position
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) and layer.is_initialized:
                layer.cumulative_length.fill_(length)

    def length(self) -> int:
        return self._length

    def forward(self, **inputs) -> torch.Tensor:
        first = next(iter(inputs.values()))
        count = first.shape[1]
        position = torch.arange(self._length, self._length + count, device=first.device)
        run = self.step if "input_ids" in inputs and count == 1 else self.llm
        logits = run(**inputs, past_key_values=self.cache, cache_position=position, use_cache=True,
                     logits_to_keep=1).logits
        self._length += count
        return logits.clone()  # CUDA graphs reuse their output buffer on the next step


def new_kv_cache(llm: torch.nn.Module, compile: bool, context: int) -> DynamicKV:
    """A conversation's KV cache: static with a compiled decode step (shared by the LLM's sessions) if ``compile``."""
    if not compile:
        return DynamicKV(llm)
    if llm not in _COMPILED:
        if next(llm.parameters()).device.type == "cuda":
            _COMPILED[llm] = torch.compile(llm, mode="reduce-overhead", dynamic=False)
        else:
            _COMPILED[llm] = torch.compile(llm, backend=CPU_BACKEND, dynamic=False)
    return StaticKV(llm, _COMPILED[llm], context)

"""The LLM on a vLLM server: the part the app keeps (token embeddings) and the streamed completion.

With ``runtime.llm_backend: vllm`` a family loads a :class:`RemoteLLM` where it would load the
transformers model: the input-embedding matrix alone (read from the checkpoint by key, the other
layers never read), the folder's config and generation config, and the server. The chat engine
builds the prompt's embeddings as it always does (text rows, image rows, earlier turns) and sends
them to ``/v1/completions`` as vLLM's ``prompt_embeds`` (``torch.save`` bytes in base64); the answer
comes back token id by token id, and the engine applies the same stop rules and clean-up as in process.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, GenerationConfig

from ..config import Config
from ..config import GenerationConfig as Settings
from ..errors import BadInputError, ConfigError, LLMServerError, XrayGPTError
from ..generation import HF_DEFAULT_TOP_K
from .server import LLMServer, server_for

log = logging.getLogger(__name__)

EMBEDDING_KEYS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                  "language_model.model.embed_tokens.weight", "transformer.wte.weight")


class InProcessOnlyError(XrayGPTError):
    """Something needs the LLM's layers in this process (maps, beams), which the vLLM backend does not have."""

    exit_code = 2


def read_embedding_matrix(folder: Path) -> torch.Tensor:
    """The input-embedding rows of a Hugging Face folder, without reading its other tensors.

    Safetensors are opened lazily by key; pickled ``.bin`` shards are memory-mapped, so only the
    shard that holds the matrix is touched, and only its pages of that matrix are read.
    """
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            key = _embedding_key(weight_map, folder)
            return _read_tensor(folder / weight_map[key], key)
        if (folder / single).is_file():
            return _read_tensor(folder / single, None)
    raise ConfigError(f"{folder}: no model.safetensors or pytorch_model.bin (nor their index) to read the token"
                      " embeddings from")


def _embedding_key(keys, folder: Path) -> str:
    found = [k for k in EMBEDDING_KEYS if k in keys]
    if not found:
        raise ConfigError(f"{folder}: none of {', '.join(EMBEDDING_KEYS)} is in the checkpoint; cannot read the token"
                          " embeddings the vLLM backend sends")
    return found[0]


def _read_tensor(file: Path, key: str | None) -> torch.Tensor:
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(key or _embedding_key(set(handle.keys()), file.parent))
    state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    return state[key or _embedding_key(state, file.parent)].clone()


class RemoteLLM(nn.Module):
    """Stands where the transformers LLM would: embeddings, config and generation config, and the server."""

    def __init__(self, embeddings: nn.Embedding, config, generation_config: GenerationConfig, server: LLMServer):
        super().__init__()
        self.embed_tokens = embeddings
        self.config, self.generation_config, self.server = config, generation_config, server

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, *args, **kwargs):
        # Only the answer heatmaps call the LLM directly (the chat engine streams from the server).
        raise InProcessOnlyError("Heatmaps of an answer need the language model's layers in this process; with"
                                 " runtime.llm_backend: vllm they run on the server. Zero-shot maps still work; for"
                                 " answer maps run the app with runtime.llm_backend: transformers.")


def load_remote_llm(config: Config, folder: Path, dtype: torch.dtype, device: torch.device, context: int,
                    progress=None) -> RemoteLLM:
    """The embedding matrix of ``folder`` and a ready server (launched or reached) for its LLM."""
    if config.weights.lora:
        raise ConfigError("weights.lora needs the in-process LLM: with runtime.llm_backend: vllm merge the adapter"
                          " into an LLM folder and serve that (llm_server.launch.model).")
    llm_config = AutoConfig.from_pretrained(folder)
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the model config's ids
        generation_config = GenerationConfig.from_model_config(llm_config)
    weight = read_embedding_matrix(folder).to(device, dtype)
    embeddings = nn.Embedding.from_pretrained(weight, freeze=True)
    server = server_for(config, folder, min(context, llm_config.max_position_embeddings), progress)
    return RemoteLLM(embeddings, llm_config, generation_config, server).eval()


def request_body(model: str, embeds: torch.Tensor, settings: Settings, stop_ids: list[int],
                 allowed_ids: int | None) -> dict:
    """The ``/v1/completions`` request for one answer: the prompt embeddings and the sampling settings.

    The settings map one to one onto vLLM's: greedy is temperature 0; sampling keeps transformers'
    top-k 50 that XrayGPT's sampling uses; min_length becomes min_tokens. ``allowed_ids``: the
    tokenizer's size when the LLM has padding rows, which are never generated (as in process).
    """
    if settings.num_beams > 1:
        raise BadInputError("Beam search (beams > 1) is not available with the vLLM backend: set beams to 1, or run"
                            " the LLM in process (runtime.llm_backend: transformers).")
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    body = {"model": model, "prompt_embeds": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "max_tokens": settings.max_new_tokens, "min_tokens": settings.min_length,
            "repetition_penalty": settings.repetition_penalty, "stop_token_ids": stop_ids,
            "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if settings.do_sample:
        body.update(temperature=settings.temperature, top_p=settings.top_p, top_k=HF_DEFAULT_TOP_K)
        if settings.seed is not None:
            body["seed"] = settings.seed
    else:
        body["temperature"] = 0.0
    if allowed_ids is not None:
        body["allowed_token_ids"] = list(range(allowed_ids))
    return body


def stream_tokens(server: LLMServer, body: dict, usage: dict) -> Iterator[int]:
    """Send ``body`` and yield the answer's token ids as they arrive; ``usage`` gets the server's counts.

    Closing the generator closes the connection, which makes vLLM abort the request (Stop, a stop
    sequence found here, a new image). A lost connection or a silent server becomes a plain message.
    """
    server.wait_ready()
    conn, response = server.connection(), None
    try:
        try:
            conn.connect()
        except OSError as exc:
            server.lost()
            raise LLMServerError(f"The language model server cannot be reached ({type(exc).__name__}). Try again in"
                                 " a moment.") from None
        conn.sock.settimeout(server.token_timeout)  # from here on: the longest wait for the next token
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            server.lost()
            raise _lost(server, exc, "") from None
        if response.status != 200:
            raise LLMServerError(f"The language model server refused this answer: {_server_message(response)}")
        yield from _read_events(server, response, usage)
    finally:  # the response holds its own handle on the socket: close both, or the server never sees us go
        if response is not None:
            response.close()
        conn.close()


def _read_events(server: LLMServer, response: http.client.HTTPResponse, usage: dict) -> Iterator[int]:
    finished, last = False, []
    try:
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise LLMServerError(f"The language model server failed on this answer: {event['error']}")
            usage.update(event.get("usage") or {})
            for choice in event.get("choices", []):
                if choice.get("finish_reason") is not None:  # the server is done: its usage (prefix-cache hits)
                    finished, last = True, choice.get("token_ids") or []  # follows, read before the last tokens
                else:
                    yield from choice.get("token_ids") or []
    except (OSError, http.client.HTTPException) as exc:
        server.lost()
        raise _lost(server, exc, "The answer was cut: ") from None
    if not finished:
        server.lost()
        raise LLMServerError("The answer was cut: the language model server closed the connection mid-answer."
                             " Try again in a moment.")
    yield from last


def _lost(server: LLMServer, exc: Exception, prefix: str) -> LLMServerError:
    """A plain message for a request that lost its server: silent too long, or not there."""
    if isinstance(exc, socket.timeout):
        return LLMServerError(f"{prefix}The language model server sent nothing for {server.token_timeout:g} s"
                              " (llm_server.token_timeout_s). Try again in a moment.")
    return LLMServerError(f"{prefix}The language model server lost the connection ({type(exc).__name__}). Try"
                          " again in a moment.")


def _server_message(response: http.client.HTTPResponse) -> str:
    body = response.read().decode("utf-8", "replace")
    try:
        message = json.loads(body).get("error", {}).get("message") or body
    except (ValueError, AttributeError):
        message = body
    return f"{message.strip()[:400]} (HTTP {response.status})"


def remote_tokens(llm: RemoteLLM, embeds: torch.Tensor, settings: Settings, stop_ids: list[int],
                  allowed_ids: int | None, timings: dict) -> Iterator[int]:
    """The chat engine's token source for a remote LLM; ``timings`` gets the prefix-cache counts at the end."""
    usage: dict = {}
    body = request_body(llm.server.model_name, embeds, settings, stop_ids, allowed_ids)
    started = time.perf_counter()
    try:
        yield from stream_tokens(llm.server, body, usage)
    finally:
        if usage:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            timings.update(reused_tokens=cached, prefilled_tokens=usage.get("prompt_tokens", 0) - cached,
                           server_s=time.perf_counter() - started)

"""The ``llm_server`` config section: where the LLM runs with ``runtime.llm_backend: vllm``.

Kept beside ``config.py`` (which holds the other sections) so that file stays one read; ``config.py``
imports these classes and calls :func:`check_backend` when it validates a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..yamlconfig import absolute_path

LLM_BACKENDS = ("transformers", "vllm")
CONCURRENCY = {"transformers": 1, "vllm": 16}  # app.generation_concurrency's default per backend
SERVER_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class LaunchConfig:
    """The vLLM server the app starts itself when ``llm_server.url`` is empty (see xraygpt_app/serving/server.py)."""

    command: list[str] = field(default_factory=list)  # Python with vllm; empty: .venv-vllm/bin/python (setup.sh --vllm)
    model: str = ""  # the LLM folder it serves; empty: weights.llama_model
    port: int = 0  # on 127.0.0.1; 0: a free port
    dtype: str = "auto"  # auto: as runtime.mode (fp32 -> float32, fp16, bf16); or float32, float16, bfloat16
    kv_cache_bytes: int | None = None  # --kv-cache-memory-bytes; None: 1 GiB on the CPU build, vLLM's share on GPUs
    max_num_seqs: int = 16  # answers the server decodes together
    block_size: int | None = None  # None: 32 on the CPU build (prefix reuse in whole blocks), vLLM's default on GPUs
    enforce_eager: bool | None = None  # None: eager on the CPU build (starts ~25 s sooner), compiled on GPUs
    extra_args: list[str] = field(default_factory=list)  # more vLLM flags, e.g. [--tensor-parallel-size, "2"]


@dataclass
class LLMServerConfig:
    """A vLLM server at ``url``, or one launched as ``launch`` says (docs/deployment-vllm.md)."""

    url: str = ""  # e.g. http://127.0.0.1:8000 (vLLM's OpenAI server with --enable-prompt-embeds)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    start_timeout_s: float = 600.0  # a launched server must be healthy within this
    connect_timeout_s: float = 10.0  # connecting, and waiting for a restarting server, per request
    token_timeout_s: float = 120.0  # the longest wait for the next streamed token (the first includes prefill)


def check_backend(config: Any, source: str, base: Path) -> None:
    """Validate ``runtime.llm_backend`` and ``llm_server``; fill the defaults that follow the backend."""
    backend = config.runtime.llm_backend
    if backend not in LLM_BACKENDS:
        raise ConfigError(f"{source}: runtime.llm_backend must be one of {', '.join(LLM_BACKENDS)}, got {backend!r}")
    if config.app.generation_concurrency is None:
        config.app.generation_concurrency = CONCURRENCY[backend]
    if config.app.generation_concurrency < 1:
        raise ConfigError(f"{source}: app.generation_concurrency must be at least 1")
    launch = config.llm_server.launch
    if launch.dtype not in SERVER_DTYPES:
        raise ConfigError(f"{source}: llm_server.launch.dtype must be one of {', '.join(SERVER_DTYPES)},"
                          f" got {launch.dtype!r}")
    if launch.model:
        launch.model = absolute_path(launch.model, base)
    if backend == "vllm" and config.runtime.mode in ("8bit", "4bit", "low_resource"):
        raise ConfigError(f"{source}: runtime.mode {config.runtime.mode} quantises the in-process LLM; with"
                          " runtime.llm_backend: vllm the server decides (llm_server.launch.dtype, or vLLM's own"
                          " --quantization in llm_server.launch.extra_args)")

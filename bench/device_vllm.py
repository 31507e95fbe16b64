"""The device check's vLLM step: the real-size random Vicuna served by vLLM, decode speed at 1 and 8 users.

    python bench/device_check.py vllm --out DIR [--dry-run] [--vllm-python PY]

The server is started the way the app starts it (``xraygpt_app.serving.server``: OpenAI server module,
prompt embeddings on) from ``--vllm-python`` (a Python that has ``vllm``; none: the row says skipped).
Each user sends 64 prompt-embedding rows of the checkpoint's own token embeddings and asks for exactly
``NEW_TOKENS`` greedy tokens. Decode tokens/s: tokens after the first over the time from the first
to the last token (1 user: that request's; 8 users at once: all tokens over the span of all of them).
Bound: the device's copy bandwidth over the weight bytes a decode step reads (8 users: one read of the
weights serves all eight, so 8 x that, less their KV cache reads, which are small at these lengths).
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import torch

from xraygpt_app.config import GenerationConfig, load_config
from xraygpt_app.serving.remote import read_embedding_matrix, request_body, stream_tokens
from xraygpt_app.serving.server import LLMServer, launch_command

PROMPT_ROWS = 64
USERS = 8


def weight_bytes(folder: Path) -> int:
    """Bytes of the LLM's weights a decode step reads: all of them except the input embedding."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if "embed_tokens" not in key:
                    view = handle.get_slice(key)
                    total += torch.Size(view.get_shape()).numel() * 2  # float16 files
    return total


def timed_answer(server: LLMServer, body: dict, times: list[float], barrier: threading.Barrier | None) -> None:
    """Stream one answer, noting when each token arrived."""
    if barrier is not None:
        barrier.wait()
    for _ in stream_tokens(server, body, {}):
        times.append(time.perf_counter())


def decode_rates(server: LLMServer, bodies: list[dict]) -> tuple[float, float]:
    """(aggregate decode tokens/s, median per-user decode tokens/s) with every body sent at once."""
    times: list[list[float]] = [[] for _ in bodies]
    barrier = threading.Barrier(len(bodies)) if len(bodies) > 1 else None
    threads = [threading.Thread(target=timed_answer, args=(server, body, t, barrier))
               for body, t in zip(bodies, times, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    span = max(t[-1] for t in times) - min(t[0] for t in times)
    per_user = statistics.median((len(t) - 1) / (t[-1] - t[0]) for t in times)
    return sum(len(t) - 1 for t in times) / span, per_user


def run_vllm(root: Path, scale: float, device: str, python: str, new_tokens: int, bandwidth: float) -> dict:
    """Serve ``root``'s Vicuna folder with vLLM from ``python``; decode speed at 1 and 8 users against the bound."""
    if not python:
        return {"skipped": "no vllm"}
    import realsize

    folder = root / "Vicuna_Radiology_fp16"
    dtype = "float16" if device == "cuda" else "float32"  # the CPU build's float16 is slow and inexact
    server_sets = ["runtime.llm_backend=vllm", f"llm_server.launch.command=[{python}]",
                   f"llm_server.launch.dtype={dtype}"]
    if device != "cuda":  # a GPU server takes its share of the device; the CPU build gets a small cache
        server_sets.append("llm_server.launch.kv_cache_bytes=268435456")
    config = load_config(realsize.REAL_CONFIG, [*realsize.overrides(root, scale, "fp32", "cpu"), *server_sets])
    command, port = launch_command(config, folder, 1024)
    server = LLMServer(f"http://127.0.0.1:{port}", command, start_timeout=900)
    started = time.perf_counter()
    try:
        server.start()
        start_s = time.perf_counter() - started
        rows = read_embedding_matrix(folder)
        settings = GenerationConfig(max_new_tokens=new_tokens, min_length=new_tokens, do_sample=False)
        generator = torch.Generator().manual_seed(0)
        bodies = [request_body(server.model_name, rows[torch.randint(3, len(rows), (PROMPT_ROWS,), generator=generator)]
                               .to(getattr(torch, dtype)), settings, [], None) for _ in range(USERS + 1)]
        decode_rates(server, bodies[:1])  # warm-up
        one, _ = decode_rates(server, bodies[1:2])
        eight, per_user = decode_rates(server, bodies[1:])
    except Exception as exc:  # noqa: BLE001 - the row says what went wrong, the other steps go on
        return {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0]}", "server_output": server.last_output()}
    finally:
        server.stop()
    bound = bandwidth / weight_bytes(folder)
    return {"device": device, "dtype": dtype, "start_s": start_s, "new_tokens": new_tokens,
            "decode_1_user_tokens_per_s": one, "decode_8_users_tokens_per_s": eight,
            "decode_8_users_per_user_tokens_per_s": per_user, "bandwidth_bound_1_user_tokens_per_s": bound,
            "decode_1_vs_bound": one / bound, "decode_8_vs_8x_bound": eight / (USERS * bound),
            "speedup_8_vs_1": eight / one}

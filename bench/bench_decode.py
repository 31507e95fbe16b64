"""Where a decode step's time goes on the CPU: the chat engine's loop, the cache, the LLM's forward.

    python bench/bench_decode.py [--config CFG] [--tokens 48] [--threads 1] [--compile] [--json]

Default model: the mid-size random Assistant of ``bench/midsize.py``. After a warm-up turn it measures,
per generated token (greedy, a fixed number of tokens):

1. the whole engine step (``ChatSession`` timings: pick the token, stop checks, stream text, forward);
2. the bare forward loop (``llm(input_ids=..., past_key_values=DynamicCache)`` only), so 1 - 2 is the
   engine's Python loop;
3. the cache: appending one position to every layer of a ``DynamicCache`` at the conversation's length;
   and inside the forward, ``torch.profiler``'s self time per ATen op as shares of the forward, grouped:
   matrix products, attention, ``cat`` (cache appends and RoPE), other ops; the rest is Python and
   framework overhead (modules, dispatch, masks);
4. with ``--compile``: the engine step with ``runtime.compile: true`` (a static cache and
   ``torch.compile``'s inductor decode step; compiling takes minutes on a small CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import midsize  # noqa: E402

GROUPS = {  # ATen op name fragments -> group
    "matmul": ("mm", "addmm", "linear", "matmul", "bmm"),
    "attention": ("scaled_dot_product", "_flash_attention", "softmax"),
    "cat (cache append + RoPE)": ("cat",),  # the profiler records no shapes for tensor lists: one group
}


def _group(op: str) -> str:
    name = op.removeprefix("aten::")
    for group, fragments in GROUPS.items():
        if any(name == f or name.startswith(f + "_") or name.startswith("_" + f) for f in fragments):
            return group
    return "other ops"


def cpu_seconds(fn) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def engine_step(xray, image, tokens: int) -> float:
    """CPU seconds per token of the chat engine's decode: a turn of ``tokens`` minus a turn of one, per token.

    Process CPU time, not wall time: on a shared machine a neighbour's load hardly moves it.
    """
    def turn(count: int) -> float:
        session = xray.chat(image)
        return cpu_seconds(lambda: session.ask("Describe the image.", do_sample=False, max_new_tokens=count,
                                                min_length=count))

    turn(tokens)  # warm-up
    return (turn(tokens) - turn(1)) / (tokens - 1)


def forward_loop(xray, image, tokens: int, profile: bool) -> tuple[float, dict[str, float]]:
    """CPU seconds per token of the bare forward on a DynamicCache, and (profiled) op time per group."""
    import torch
    from torch.profiler import ProfilerActivity
    from transformers import DynamicCache

    llm = xray.model.llm
    session = xray.chat(image)
    prompt = session._prepare("Describe the image.", tokens)
    with torch.inference_mode():
        cache = DynamicCache(config=llm.config)
        logits = llm(inputs_embeds=prompt.embeds, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        groups: dict[str, float] = {}
        profiler = torch.profiler.profile(activities=[ProfilerActivity.CPU]) if profile else None
        if profiler:
            profiler.__enter__()
        started, wall = time.process_time(), time.perf_counter()
        for _ in range(tokens):
            logits = llm(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        elapsed, wall = (time.process_time() - started) / tokens, (time.perf_counter() - wall) / tokens
        if profiler:
            profiler.__exit__(None, None, None)
            for event in profiler.key_averages():
                if event.key.startswith("aten::"):
                    group = _group(event.key)
                    groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e6 / tokens / wall
            groups["Python/framework"] = 1 - sum(groups.values())  # the forward's time outside every ATen op
    return elapsed, groups  # groups: shares of the profiled forward's wall time (the profiler times wall-clock)


def cache_append(llm_config, context: int, tokens: int) -> float:
    """CPU seconds per token for appending one position to every layer of a DynamicCache holding ``context``."""
    import torch
    from transformers import DynamicCache

    heads = getattr(llm_config, "num_key_value_heads", None) or llm_config.num_attention_heads
    shape = (1, heads, context, llm_config.hidden_size // llm_config.num_attention_heads)
    cache = DynamicCache(config=llm_config)
    for layer in range(llm_config.num_hidden_layers):
        cache.update(torch.zeros(shape), torch.zeros(shape), layer)
    step = torch.zeros(*shape[:2], 1, shape[3])
    return cpu_seconds(lambda: [cache.update(step, step, layer) for _ in range(tokens)
                                for layer in range(llm_config.num_hidden_layers)]) / tokens


def measure(config: str, tokens: int, compile_too: bool) -> dict:
    from xraygpt_app.api import Assistant

    image = midsize.sample_image()
    xray = Assistant.from_config(config, ["runtime.mode=fp32"])
    engine = statistics.median(engine_step(xray, image, tokens) for _ in range(3))
    forward = statistics.median(forward_loop(xray, image, tokens, profile=False)[0] for _ in range(3))
    _, shares = forward_loop(xray, image, tokens, profile=True)
    context = len(xray.chat(image)._prepare("Describe the image.", tokens).ids) + tokens // 2
    row = {"tokens": tokens, "engine_s": engine, "forward_s": forward, "engine_loop_s": engine - forward,
           "forward_shares": shares, "context": context,
           "cache_append_s": cache_append(xray.model.llm.config, context, tokens)}
    if compile_too:
        compiled = Assistant.from_config(config, ["runtime.mode=fp32", "runtime.compile=true"])
        started = time.perf_counter()
        engine_step(compiled, image, 4)  # triggers the compilation
        row["compile_s"] = time.perf_counter() - started
        row["engine_compiled_s"] = statistics.median(engine_step(compiled, image, tokens) for _ in range(3))
    return row


def print_row(row: dict) -> None:
    ms = 1000
    print(f"per decode step, {row['tokens']} tokens, CPU milliseconds (median of 3):")
    print(f"  chat engine step           {row['engine_s'] * ms:8.2f}")
    print(f"  bare forward (DynamicCache){row['forward_s'] * ms:8.2f}")
    print(f"  => engine loop (Python)    {row['engine_loop_s'] * ms:8.2f}")
    print(f"  in the forward: DynamicCache append (all layers, context {row['context']})"
          f"{row['cache_append_s'] * ms:8.2f}")
    print("  inside the forward (share of a profiled run's wall time; the profiler adds its own cost):")
    for group, share in sorted(row["forward_shares"].items(), key=lambda kv: -kv[1]):
        print(f"    {group:<24}{share:8.0%}")
    if "engine_compiled_s" in row:
        print(f"  runtime.compile engine step{row['engine_compiled_s'] * ms:8.2f}"
              f"  (compiled in {row['compile_s']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a project YAML config (default: build the mid-size random model)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time runtime.compile (inductor)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="xraygpt-decode-") as tmp:
        config = args.config or str(midsize.build_midsize(Path(tmp)))
        row = measure(config, args.tokens, args.compile)
    print(json.dumps(row, indent=1)) if args.json else print_row(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

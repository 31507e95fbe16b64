"""Per-stage latency and follow-up time-to-first-token (TTFT) with and without KV-cache reuse.

    python bench/bench_latency.py [--config CFG] [--set k=v ...] [--turns 8] [--repeats 3] [--json]

Without ``--config`` a mid-size random model (``bench/midsize.py``) is written to a temporary folder
in the native formats and loaded through ``Assistant.from_config``. Every repetition runs the same
conversation (greedy, fixed ``--max-new-tokens``) twice, interleaved: once reusing the KV cache
(``chat(image, reuse_kv=True)``), once re-running the whole prompt each turn as the reference does.
Figures are medians over the repetitions. It also counts calls to the model's ``encode_image``
(wrapped here, not in the package): one per conversation means the image is never re-encoded.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import midsize  # noqa: E402

from xraygpt_app.api import Assistant  # noqa: E402

QUESTIONS = (
    "Describe the given chest x-ray image in detail.",
    "Is there evidence of pleural effusion?",
    "Is the heart size normal?",
    "Are there any signs of pneumothorax?",
    "What about the lung bases?",
    "Is there any consolidation?",
    "Are the costophrenic angles sharp?",
    "Summarise the findings in one sentence.",
    "Is there any support device visible?",
    "What would you compare with a prior study?",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a project YAML config (default: build the mid-size random model)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steadier on a shared 2-core machine)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--same-question", action="store_true",
                        help="ask the same follow-up every turn, so only the context grows between turns")
    return parser.parse_args(argv)


def count_calls(model, name: str) -> list[int]:
    """Wrap ``model.<name>`` in a counter (an instance attribute; the class is untouched)."""
    counter = [0]
    original = getattr(model, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    setattr(model, name, wrapped)
    return counter


def time_forward(llm) -> list[float]:
    """Record the process CPU time of every LLM forward call (an instance attribute; the class is untouched).

    CPU time is what the forward cost this process: unlike wall time it barely moves when other
    processes share the cores.
    """
    cpu_times: list[float] = []
    original = llm.forward

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            cpu_times.append(time.process_time() - start)

    llm.forward = timed
    return cpu_times


def run_conversation(xray: Assistant, image, reuse_kv: bool, turns: int, max_new_tokens: int,
                     cpu_times: list[float], same_question: bool = False) -> dict:
    """One conversation of ``turns`` questions; returns encoding timings and per-turn figures.

    ``min_length = max_new_tokens`` keeps the random model from ending an answer with EOS early, so
    every turn adds the same number of generated tokens (XrayGPT's default min_length is 1).
    """
    session = xray.chat(image, reuse_kv=reuse_kv)
    rows = []
    for i in range(turns):
        cpu_times.clear()
        question = QUESTIONS[1] if same_question and i else QUESTIONS[i % len(QUESTIONS)]
        result = session.ask(question, do_sample=False, max_new_tokens=max_new_tokens,
                             min_length=max_new_tokens)
        t = result.timings
        rows.append({"ttft_s": t["time_to_first_token_s"], "prefill_s": t["prefill_s"],
                     "prefill_cpu_s": cpu_times[0],
                     "decode_per_token_s": t["decode_s"] / max(t["new_tokens"], 1),
                     "decode_cpu_per_token_s": statistics.mean(cpu_times[1:]) if len(cpu_times) > 1 else 0.0,
                     "prefilled_tokens": t["prefilled_tokens"], "reused_tokens": t["reused_tokens"],
                     "new_tokens": t["new_tokens"], "token_ids": result.token_ids})
    return {"encoding": dict(session.encoding.timings), "turns": rows}


def median_of(runs: list[dict], key: str, turn: int) -> float:
    return statistics.median(run["turns"][turn][key] for run in runs)


def summarise(runs: dict[bool, list[dict]], turns: int, encode_calls: int, conversations: int) -> dict:
    """Medians per stage and per turn, the TTFT ratio, and the re-encoding check."""
    reuse, full = runs[True], runs[False]
    all_runs = reuse + full
    stages = {key: statistics.median(run["encoding"][key] for run in all_runs)
              for key in ("preprocess_s", "vision_s", "qformer_s")}
    stages["prefill_turn1_s"] = statistics.median(run["turns"][0]["prefill_s"] for run in all_runs)
    for key in ("decode_per_token_s", "decode_cpu_per_token_s"):
        stages[key] = statistics.median(row[key] for run in all_runs for row in run["turns"])
    table = [{"turn": i + 1, "prompt_tokens": full[0]["turns"][i]["prefilled_tokens"],
              "prefilled_reuse": reuse[0]["turns"][i]["prefilled_tokens"],
              "ttft_reuse_s": median_of(reuse, "ttft_s", i),
              "prefill_cpu_reuse_s": median_of(reuse, "prefill_cpu_s", i),
              "ttft_full_s": median_of(full, "ttft_s", i), "prefill_cpu_full_s": median_of(full, "prefill_cpu_s", i),
              "new_tokens": full[0]["turns"][i]["new_tokens"]}
             for i in range(turns)]
    for row in table:  # what a TTFT means: per prefilled token, and against recomputing the whole prompt
        row["ttft_per_token_reuse_ms"] = row["ttft_reuse_s"] * 1e3 / max(row["prefilled_reuse"], 1)
        row["ttft_per_token_full_ms"] = row["ttft_full_s"] * 1e3 / max(row["prompt_tokens"], 1)
        row["speedup_ttft"] = row["ttft_full_s"] / row["ttft_reuse_s"]
        row["speedup_cpu"] = row["prefill_cpu_full_s"] / row["prefill_cpu_reuse_s"]
    same = all(r["turns"][i]["token_ids"] == f["turns"][i]["token_ids"]
               for r, f in zip(reuse, full, strict=True) for i in range(turns))
    ratio = ratio_cpu = None
    per_token = [0.0, 1.0]
    if turns >= 2:
        ratio = table[-1]["ttft_reuse_s"] / table[1]["ttft_reuse_s"]
        ratio_cpu = table[-1]["prefill_cpu_reuse_s"] / table[1]["prefill_cpu_reuse_s"]
        per_token = [row["prefill_cpu_reuse_s"] / row["prefilled_reuse"] for row in (table[-1], table[1])]
    return {"stages_s": stages, "ttft": table, "ttft_ratio_last_vs_turn2_reuse": ratio,
            "prefill_cpu_ratio_last_vs_turn2_reuse": ratio_cpu,
            "prefill_cpu_per_token_ratio_last_vs_turn2_reuse": per_token[0] / per_token[1] if turns >= 2 else None,
            "greedy_tokens_identical_reuse_vs_full": same, "encode_image_calls": encode_calls,
            "conversations": conversations}


def print_text(summary: dict, description: str, threads: int) -> None:
    print(f"model: {description}; torch threads: {threads}")
    print("per-stage latency (median, ms; *_cpu = process CPU time):")
    for key, value in summary["stages_s"].items():
        print(f"  {key:<24} {value * 1e3:8.1f}")
    print("\nfollow-up time to first token (median, ms): TTFT = wall time to the first token (TurnResult.timings);")
    print("cpu = process CPU time of the prefill forward (robust to other load on the machine); /tok = TTFT per")
    print("prefilled token; full/reuse = how many times faster the KV-reuse TTFT is than recomputing the whole prompt")
    print(f"  {'turn':>4} {'prompt':>6} | {'KV reuse: prefilled':>19} {'TTFT':>7} {'/tok':>6} {'cpu':>7} |"
          f" {'full recompute: TTFT':>20} {'/tok':>6} {'cpu':>7} | {'full/reuse TTFT':>15} {'cpu':>5}")
    for row in summary["ttft"]:
        print(f"  {row['turn']:>4} {row['prompt_tokens']:>6} | {row['prefilled_reuse']:>19}"
              f" {row['ttft_reuse_s'] * 1e3:>7.1f} {row['ttft_per_token_reuse_ms']:>6.2f}"
              f" {row['prefill_cpu_reuse_s'] * 1e3:>7.1f} |"
              f" {row['ttft_full_s'] * 1e3:>20.1f} {row['ttft_per_token_full_ms']:>6.2f}"
              f" {row['prefill_cpu_full_s'] * 1e3:>7.1f} | {row['speedup_ttft']:>15.2f} {row['speedup_cpu']:>5.2f}")
    if summary["ttft_ratio_last_vs_turn2_reuse"] is not None:
        _print_ratio_note(summary)
    print(f"greedy tokens identical with and without KV reuse: {summary['greedy_tokens_identical_reuse_vs_full']}")
    print(f"encode_image calls: {summary['encode_image_calls']} for {summary['conversations']} conversations"
          f" (one per conversation: the image is never re-encoded per turn)")


def _print_ratio_note(summary: dict) -> None:
    """Turn N against turn 2 with KV reuse, and what explains the difference (the prefilled length)."""
    table = summary["ttft"]
    last, second = table[-1], table[1]
    print(f"\nwith KV reuse, turn {last['turn']} / turn 2: TTFT {summary['ttft_ratio_last_vs_turn2_reuse']:.2f},"
          f" prefill CPU time {summary['prefill_cpu_ratio_last_vs_turn2_reuse']:.2f} (target <= 1.2);"
          f" prefill CPU time per prefilled token {summary['prefill_cpu_per_token_ratio_last_vs_turn2_reuse']:.2f}")
    print(f"  turn {last['turn']} prefills {last['prefilled_reuse']} new tokens, turn 2 {second['prefilled_reuse']}"
          f" (the re-tokenized answer tail plus the new question): TTFT per prefilled token"
          f" {last['ttft_per_token_reuse_ms']:.2f} vs {second['ttft_per_token_reuse_ms']:.2f} ms;"
          f" at turn {last['turn']} KV reuse is {last['speedup_ttft']:.1f}x faster than recomputing"
          f" all {last['prompt_tokens']} prompt tokens ({last['speedup_cpu']:.1f}x in CPU time)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="xraygpt-bench-") as tmp:
        config = args.config or midsize.build_midsize(Path(tmp))
        description = args.config or "mid-size random model (bench/midsize.py)"
        description += "".join(f" --set {item}" for item in args.overrides)
        torch.set_num_threads(args.threads)
        xray = Assistant.from_config(config, args.overrides)
        image = midsize.sample_image()
        calls = count_calls(xray.model, "encode_image")
        cpu_times = time_forward(xray.model.llm)
        run_conversation(xray, image, True, 2, args.max_new_tokens, cpu_times)  # warm-up, not counted
        calls[0] = 0
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(args.repeats):
            for reuse in (True, False):  # interleaved, so drifts in machine load hit both alike
                runs[reuse].append(run_conversation(xray, image, reuse, args.turns, args.max_new_tokens, cpu_times,
                                                    args.same_question))
    summary = summarise(runs, args.turns, calls[0], 2 * args.repeats)
    summary.update(model=description, threads=args.threads)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_text(summary, description, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-stage latency and follow-up time-to-first-token (TTFT) with and without KV-cache reuse.

    python bench/bench_latency.py [--config CFG] [--set k=v ...] [--turns 8] [--repeats 3] [--json]

Without ``--config`` a mid-size random model (``bench/midsize.py``) is written to a temporary folder
in the native formats and loaded through ``XrayGPT.from_config``. Every repetition runs the same
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import midsize  # noqa: E402

from xraygpt_app.api import XrayGPT  # noqa: E402

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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
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


def run_conversation(xray: XrayGPT, image, reuse_kv: bool, turns: int, max_new_tokens: int) -> dict:
    """One conversation of ``turns`` questions; returns encoding timings and per-turn figures."""
    session = xray.chat(image, reuse_kv=reuse_kv)
    rows = []
    for i in range(turns):
        result = session.ask(QUESTIONS[i % len(QUESTIONS)], do_sample=False, max_new_tokens=max_new_tokens)
        t = result.timings
        rows.append({"ttft_s": t["time_to_first_token_s"], "prefill_s": t["prefill_s"],
                     "decode_per_token_s": t["decode_s"] / max(t["new_tokens"], 1),
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
    stages["decode_per_token_s"] = statistics.median(row["decode_per_token_s"] for run in all_runs
                                                     for row in run["turns"])
    table = [{"turn": i + 1, "prompt_tokens": full[0]["turns"][i]["prefilled_tokens"],
              "ttft_reuse_s": median_of(reuse, "ttft_s", i),
              "prefilled_reuse": reuse[0]["turns"][i]["prefilled_tokens"],
              "ttft_full_s": median_of(full, "ttft_s", i), "new_tokens": full[0]["turns"][i]["new_tokens"]}
             for i in range(turns)]
    same = all(r["turns"][i]["token_ids"] == f["turns"][i]["token_ids"]
               for r, f in zip(reuse, full, strict=True) for i in range(turns))
    ratio = table[-1]["ttft_reuse_s"] / table[1]["ttft_reuse_s"] if turns >= 2 else None
    return {"stages_s": stages, "ttft": table, "ttft_ratio_last_vs_turn2_reuse": ratio,
            "greedy_tokens_identical_reuse_vs_full": same, "encode_image_calls": encode_calls,
            "conversations": conversations}


def print_text(summary: dict, description: str) -> None:
    print(f"model: {description}")
    print("per-stage latency (median, ms):")
    for key, value in summary["stages_s"].items():
        print(f"  {key:<20} {value * 1e3:8.1f}")
    print("\nfollow-up time to first token (median, ms):")
    print(f"  {'turn':>4} {'prompt tok':>10} {'KV reuse':>9} {'prefilled':>9} {'full':>9} {'full/reuse':>10}"
          f" {'new tok':>7}")
    for row in summary["ttft"]:
        print(f"  {row['turn']:>4} {row['prompt_tokens']:>10} {row['ttft_reuse_s'] * 1e3:>9.1f}"
              f" {row['prefilled_reuse']:>9} {row['ttft_full_s'] * 1e3:>9.1f}"
              f" {row['ttft_full_s'] / row['ttft_reuse_s']:>10.2f} {row['new_tokens']:>7}")
    ratio = summary["ttft_ratio_last_vs_turn2_reuse"]
    if ratio is not None:
        print(f"\nTTFT(turn {len(summary['ttft'])}) / TTFT(turn 2) with KV reuse: {ratio:.2f} (target <= 1.2)")
    print(f"greedy tokens identical with and without KV reuse: {summary['greedy_tokens_identical_reuse_vs_full']}")
    print(f"encode_image calls: {summary['encode_image_calls']} for {summary['conversations']} conversations"
          f" (one per conversation: the image is never re-encoded per turn)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="xraygpt-bench-") as tmp:
        config = args.config or midsize.build_midsize(Path(tmp))
        description = args.config or "mid-size random model (bench/midsize.py), " + ", ".join(args.overrides or [])
        xray = XrayGPT.from_config(config, args.overrides)
        image = midsize.sample_image()
        calls = count_calls(xray.model, "encode_image")
        run_conversation(xray, image, True, 2, args.max_new_tokens)  # warm-up, not counted
        calls[0] = 0
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(args.repeats):
            for reuse in (True, False):
                runs[reuse].append(run_conversation(xray, image, reuse, args.turns, args.max_new_tokens))
    summary = summarise(runs, args.turns, calls[0], 2 * args.repeats)
    summary["model"] = description
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_text(summary, description)
    return 0


if __name__ == "__main__":
    sys.exit(main())

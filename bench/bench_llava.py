"""llava family on this CPU: time to first token and tokens/s, and estimates for TinyLlama-1.1B.

    python bench/bench_llava.py [--models tiny,mid] [--modes fp32,bf16,8bit] [--threads 2]
                                [--new-tokens 32] [--repeats 3] [--json]

Two random models in the real formats, loaded through ``Assistant.from_config`` (``model.family: llava``):

- **tiny**: ``tests/tinyllava.py`` (timm ViT-Ti/16 tower, 196 tokens of width 192; LLaMA hidden 64, 2 layers);
- **mid**: BiomedCLIP's own tower architecture (timm ``vit_base_patch16_224``, width 768, 86 M parameters,
  random weights) and a LLaMA of hidden 1024, 8 layers, 16 heads, intermediate 2816 and TinyLlama's
  vocabulary size (32000 rows; the fixture's 1000-piece tokenizer, so ids past it are masked).

Per model and ``runtime.mode``: the image encoding (tower + projector), the first turn's time to first
token (the prefill of the chat-template prompt with the 196 image tokens), the decode rate over
``--new-tokens`` greedy tokens (``min_length`` = that, so the random model does not stop early), and a
follow-up's time to first token with the KV cache reused. Medians over ``--repeats``.

**Estimates** (labelled so, not measurements) for TinyLlama-1.1B-Chat behind BiomedCLIP on 2 and 8
cores, from the mid-size figures: the tower is measured at its real size; the prefill scales with the
LLM's parameter count (compute-bound); a decode step scales with the bytes of weights it reads
(memory-bound; bytes per mode from ``xraygpt_app.memory.llm_weight_bytes``); 2 -> 8 cores follows
Amdahl's law, per part (image, prefill, decode step) and mode, with the parallel fraction measured on the
mid-size model at 1 and 2 threads (more cores also bring more memory bandwidth on most machines, which this
does not model; a shared machine's contention lowers the measured fraction).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import tinyllava  # noqa: E402  (tests/ holds the real-format writers)
import tinymodels  # noqa: E402

from xraygpt_app.api import Assistant  # noqa: E402
from xraygpt_app.imaging.loader import load_radiograph  # noqa: E402

QUESTIONS = ("Describe the given chest x-ray image in detail.", "Is there evidence of pleural effusion?")
IMAGE = REPO / "examples" / "nih_cxr14_00000001_000_pa_512.png"
MID_LLM = tinymodels.TinyDims(llm_hidden=1024, llm_layers=8, llm_heads=16, llm_intermediate=2816, llm_vocab=32000)
REPORT_TOKENS = 100


def build(kind: str, root: Path) -> Path:
    """Write the tiny or mid-size model under ``root``; return its config."""
    if kind == "tiny":
        return tinyllava.build_llava(root).config
    tower, text, _ = tinyllava.write_tower(root, timm_model="vit_base_patch16_224")
    tinyllava.write_chat_llm(root / "llm", MID_LLM)
    tinyllava.write_projector(root / "projector.safetensors", 768, MID_LLM.llm_hidden)
    config = root / "llava_mid.yaml"
    import yaml

    config.write_text(yaml.safe_dump(tinyllava.config_dict(tower.name, text.name, "llm", "projector.safetensors")))
    return config


def measure(config: Path, mode: str, threads: int, new_tokens: int, repeats: int) -> dict:
    """Median timings of ``repeats`` two-turn greedy conversations in ``mode`` with ``threads`` threads."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = Assistant.from_config(config, overrides=[f"runtime.mode={mode}"])
    load_s = time.perf_counter() - started
    image = load_radiograph(IMAGE).image
    settings = {"do_sample": False, "max_new_tokens": new_tokens, "min_length": new_tokens}
    runs = []
    model.chat(image).ask(QUESTIONS[0], **settings)  # warm-up: kernel selection, first-touch of the weights
    for _ in range(repeats):
        session = model.chat(image)
        first = session.ask(QUESTIONS[0], **settings)
        second = session.ask(QUESTIONS[1], **settings)
        encode = sum(v for k, v in session.encoding.timings.items() if k.endswith("_s"))
        decode_steps = max(first.timings["new_tokens"] - 1, 1)
        runs.append({"encode_s": encode, "ttft_s": first.timings["time_to_first_token_s"],
                     "decode_token_s": first.timings["decode_s"] / decode_steps,
                     "prompt_tokens": first.timings["prefilled_tokens"],
                     "followup_ttft_s": second.timings["time_to_first_token_s"],
                     "followup_prefilled": second.timings["prefilled_tokens"]})
    out = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    out.update(mode=mode, threads=threads, load_s=load_s, tokens_per_s=1 / out["decode_token_s"],
               llm_parameters=sum(p.numel() for p in model.model.llm.parameters()))
    del model
    return out


PARTS = {"vision_s": "encode_s", "prefill_s": "ttft_s", "decode_token_s": "decode_token_s"}  # estimate <- measured


def tinyllama_estimates(mid: dict[tuple[str, int], dict]) -> dict:
    """ESTIMATES for TinyLlama-1.1B from the mid-size figures at 1 and 2 threads (see the module docstring)."""
    from transformers import LlamaConfig

    from xraygpt_app.config import RuntimeConfig, VisionConfig
    from xraygpt_app.families.registry import TINYLLAMA_1B
    from xraygpt_app.memory import llm_weight_bytes
    from xraygpt_app.placement import plan_placement

    big = LlamaConfig(**TINYLLAMA_1B)
    small = LlamaConfig(hidden_size=MID_LLM.llm_hidden, num_hidden_layers=MID_LLM.llm_layers,
                        num_attention_heads=MID_LLM.llm_heads, num_key_value_heads=MID_LLM.llm_heads,
                        intermediate_size=MID_LLM.llm_intermediate, vocab_size=MID_LLM.llm_vocab,
                        tie_word_embeddings=False)
    # A prefill multiplies every token through the transformer blocks (the embedding is a lookup; the
    # engine keeps one position's logits); a decode step reads every weight but the embedding matrix.
    flop_ratio = _block_parameters(big) / _block_parameters(small)
    estimates = {}
    for mode in sorted({mode for mode, _ in mid}):
        placement = plan_placement(RuntimeConfig(mode=mode, device="cpu"), VisionConfig(), cuda_available=False)
        read_ratio = ((llm_weight_bytes(big, placement) - _embedding_bytes(big, placement))
                      / (llm_weight_bytes(small, placement) - _embedding_bytes(small, placement)))
        one, two = mid[(mode, 1)], mid[(mode, 2)]
        scale = {"vision_s": 1.0, "prefill_s": flop_ratio, "decode_token_s": read_ratio}
        parallel = {part: amdahl_parallel(one[key], two[key]) for part, key in PARTS.items()}
        two_cores = {part: two[key] * scale[part] for part, key in PARTS.items()}
        eight_cores = {part: value * amdahl(parallel[part], 8) / amdahl(parallel[part], 2)
                       for part, value in two_cores.items()}
        estimates[mode] = {"parallel_fraction": parallel, **{cores: _with_report(parts) for cores, parts in
                                                              (("2 cores", two_cores), ("8 cores", eight_cores))}}
    return estimates


def amdahl_parallel(one_thread: float, two_threads: float) -> float:
    """The parallel fraction p with t(2) = t(1) ((1 - p) + p / 2), clipped to [0, 1]."""
    return min(max(2 * (1 - two_threads / one_thread), 0.0), 1.0)


def amdahl(parallel: float, cores: int) -> float:
    return (1 - parallel) + parallel / cores


def _with_report(parts: dict[str, float]) -> dict[str, float]:
    report = parts["vision_s"] + parts["prefill_s"] + (REPORT_TOKENS - 1) * parts["decode_token_s"]
    return {**parts, "tokens_per_s": 1 / parts["decode_token_s"], "report_100_tokens_s": report}


def _block_parameters(config) -> int:
    """Parameters of the transformer blocks (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.model.layers.parameters())


def _embedding_bytes(config, placement) -> int:
    return config.vocab_size * config.hidden_size * placement.llm_dtype.itemsize


def print_text(results: dict) -> None:
    print("MEASURED on this CPU (random weights; wall time; the machine is shared, so take them as rough):")
    print(f"{'model':6} {'mode':5} {'thr':>3} {'load s':>7} {'image s':>8} {'prompt':>6} {'TTFT s':>7} "
          f"{'tok/s':>7} {'follow-up TTFT s':>17}")
    for name, rows in results["measured"].items():
        for row in rows:
            print(f"{name:6} {row['mode']:5} {row['threads']:>3} {row['load_s']:7.2f} {row['encode_s']:8.3f} "
                  f"{row['prompt_tokens']:>6} {row['ttft_s']:7.3f} {row['tokens_per_s']:7.1f} "
                  f"{row['followup_ttft_s']:17.3f}")
    if "estimates" in results:
        print("\nESTIMATES (not measured) for BiomedCLIP + TinyLlama-1.1B-Chat, a 100-token report:")
        print(f"{'mode':5} {'cores':8} {'image s':>8} {'prefill s':>10} {'tok/s':>7} {'100-token report s':>19}")
        for mode, by_cores in results["estimates"].items():
            fractions = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in by_cores["parallel_fraction"].items())
            for cores in ("2 cores", "8 cores"):
                e = by_cores[cores]
                print(f"{mode:5} {cores:8} {e['vision_s']:8.2f} {e['prefill_s']:10.2f} {e['tokens_per_s']:7.1f} "
                      f"{e['report_100_tokens_s']:19.1f}")
            print(f"      (parallel fractions from 1 vs 2 threads: {fractions})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--modes", default="fp32,bf16,8bit")
    parser.add_argument("--threads", type=int, default=2, help="threads to measure (mid: also 1, for the estimates)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results: dict = {"measured": {}, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            config = build(name, Path(tmp) / name)
            threads = (1, args.threads) if name == "mid" else (args.threads,)  # mid: 1 and 2 for the estimates
            results["measured"][name] = [measure(config, mode, t, args.new_tokens, args.repeats)
                                         for mode in args.modes.split(",") for t in threads]
    if "mid" in results["measured"] and args.threads == 2:
        results["estimates"] = tinyllama_estimates({(r["mode"], r["threads"]): r for r in results["measured"]["mid"]})
    print(json.dumps(results, indent=2) if args.json else "", end="")
    if not args.json:
        print_text(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

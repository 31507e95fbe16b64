"""Estimated vs measured peak memory per runtime mode, and the GPU estimate of the real model.

    python bench/bench_memory.py [--config CFG] [--modes fp32,bf16,8bit,4bit,low_resource] [--json]

Part 1 (this CPU): for each mode, a fresh Python process loads the model (default: the mid-size
random model of ``bench/midsize.py``, written to a temporary folder) with ``runtime.mode=MODE``
and ``llm.max_length=--context``, asks one long question that fills the context, and reports its
resident set size (RSS): after the imports (the baseline), and its peak (``ru_maxrss``). The
measured figure is peak minus baseline; the estimate from ``xraygpt_app.memory`` (CPU, no GPU)
is printed as its tensor part (total minus the host-baseline allowance) and as its total.

Part 2 (a GPU, estimated): ``estimate(load_config(eval_configs/xraygpt_eval.yaml, [mode]),
assume_cuda=True)`` for each mode, with the issue's targets. Figures only, no asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import midsize  # noqa: E402

REAL_CONFIG = midsize.REPO / "eval_configs" / "xraygpt_eval.yaml"
CPU_MODES = ("fp32", "bf16", "8bit", "4bit", "low_resource")
GPU_TARGETS_GB = {"fp16": 16.0, "8bit": 9.5, "low_resource": 8.0, "4bit": 6.0, "bf16": None, "fp32": None}
MAX_NEW_TOKENS = 16
FILLER = "The patient reports cough and mild dyspnoea; compare the lung fields, heart size and pleural spaces. "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a project YAML config (default: build the mid-size random model)")
    parser.add_argument("--modes", default=",".join(CPU_MODES), help="comma-separated modes to measure on the CPU")
    parser.add_argument("--context", type=int, default=512, help="llm.max_length for the measured runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", metavar="MODE", help=argparse.SUPPRESS)  # internal: measure one mode
    return parser.parse_args(argv)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def anon_rss_bytes() -> int:
    """Anonymous resident memory (``RssAnon``): tensors and heap, not mapped files or libraries."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def held_after_gc() -> int:
    """``RssAnon`` after returning freed heap to the OS: what the live objects hold (glibc keeps freed
    blocks of the load's temporary tensors otherwise)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return anon_rss_bytes()


class AnonPeak:
    """Samples ``RssAnon`` every 2 ms in a thread: the kernel keeps no high-water mark for it."""

    def __init__(self) -> None:
        import threading

        self.peak = anon_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, anon_rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anon_rss_bytes())


def long_question(tokenizer, budget: int) -> str:
    """A question of about ``budget`` tokens (at most the chat engine's 2000 characters)."""
    words, question = FILLER.split(), ""
    i = 0
    while len(question) < 1900 and len(tokenizer(question)["input_ids"]) < budget:
        question += words[i % len(words)] + " "
        i += 1
    return question.strip()


def measure_child(config_path: str, mode: str, context: int) -> dict:
    """In this (fresh) process: load one mode, fill the context once, report RSS figures and the estimate."""
    import logging

    from xraygpt_app.api import Assistant
    from xraygpt_app.config import load_config
    from xraygpt_app.errors import BadInputError
    from xraygpt_app.memory import estimate

    logging.basicConfig(level=logging.ERROR)
    image = midsize.sample_image()
    baseline, anon_baseline = rss_bytes(), held_after_gc()
    sampler = AnonPeak()
    config = load_config(config_path, [f"runtime.mode={mode}", f"llm.max_length={context}"])
    result = estimate(config, assume_cuda=False)
    xray = Assistant.from_config(config)
    loaded = held_after_gc()
    session = xray.chat(image)
    budget = context - MAX_NEW_TOKENS - 110  # system text, image queries and roles take about 110 tokens
    for _ in range(20):
        try:
            turn = session.ask(long_question(xray.model.tokenizer, budget), do_sample=False,
                               max_new_tokens=MAX_NEW_TOKENS)
            break
        except BadInputError:  # the question did not fit: shorten it
            budget -= 16
    else:
        raise RuntimeError("no question fitted the context")
    anon_peak = sampler.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "baseline_rss": baseline, "peak_rss": peak, "anon_baseline": anon_baseline,
            "anon_after_load": loaded, "anon_peak": anon_peak, "measured": anon_peak - anon_baseline,
            "prompt_tokens": turn.timings["prefilled_tokens"],
            "estimate_total": result.peak["cpu"], "estimate_breakdown": result.breakdown["cpu"]}


def measure_modes(config: str, modes: list[str], context: int) -> list[dict]:
    """One subprocess per mode, so one mode's allocations cannot hide another's peak."""
    return [child_json([__file__, "--child", mode, "--config", config, "--context", str(context)], mode)
            for mode in modes]


def child_json(args: list[str], mode: str) -> dict:
    """Run ``python args...`` and return the last JSON line it prints, or ``{"mode", "error"}``."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"mode": mode, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def gpu_estimates() -> list[dict]:
    from xraygpt_app.config import load_config
    from xraygpt_app.memory import estimate

    rows = []
    for mode, target in GPU_TARGETS_GB.items():
        result = estimate(load_config(REAL_CONFIG, [f"runtime.mode={mode}"]), assume_cuda=True)
        rows.append({"mode": mode, "gpu_peak": result.peak["cuda:0"], "cpu_peak": result.peak.get("cpu", 0),
                     "target_gb": target, "breakdown": result.breakdown["cuda:0"], "notes": result.notes})
    return rows


def print_text(cpu_rows: list[dict], gpu_rows: list[dict], description: str, context: int) -> None:
    mib = 2**20
    print(f"measured on this CPU: {description}, context {context} tokens, MiB")
    print("  RSS = whole resident set (ru_maxrss); anon = anonymous memory (RssAnon, sampled every 2 ms),")
    print("  above the baseline after imports; est. = xraygpt_app.memory for the CPU (tensors = total - overhead)")
    print(f"  {'mode':<13}{'RSS base':>9}{'RSS peak':>9}{'anon load':>10}{'anon peak':>10}{'est. tensors':>13}"
          f"{'est. total':>11}{'prompt tok':>11}")
    for row in cpu_rows:
        if "error" in row:
            print(f"  {row['mode']:<13} failed: {row['error']}")
            continue
        tensors = row["estimate_total"] - row["estimate_breakdown"]["overhead"]
        print(f"  {row['mode']:<13}{row['baseline_rss'] / mib:>9.0f}{row['peak_rss'] / mib:>9.0f}"
              f"{(row['anon_after_load'] - row['anon_baseline']) / mib:>10.0f}{row['measured'] / mib:>10.0f}"
              f"{tensors / mib:>13.0f}{row['estimate_total'] / mib:>11.0f}{row['prompt_tokens']:>11}")
    print("\nreal XrayGPT (EVA ViT-g + Q-Former + Vicuna-7B) on a CUDA GPU, estimated (GiB; GB = 10^9 bytes):")
    print(f"  {'mode':<13}{'GPU GiB':>8}{'GPU GB':>8}{'target GB':>10}{'host GiB':>9}  breakdown (GiB)")
    for row in gpu_rows:
        target = f"{row['target_gb']:.1f}" if row["target_gb"] else "-"
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in row["breakdown"].items() if v)
        print(f"  {row['mode']:<13}{row['gpu_peak'] / 2**30:>8.2f}{row['gpu_peak'] / 1e9:>8.2f}{target:>10}"
              f"{row['cpu_peak'] / 2**30:>9.2f}  {parts}")
    for note in sorted({note for row in gpu_rows for note in row["notes"]}):
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_child(args.config, args.child, args.context)))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="xraygpt-bench-") as tmp:
        config = args.config or str(midsize.build_midsize(Path(tmp)))
        cpu_rows = measure_modes(config, modes, args.context)
    gpu_rows = gpu_estimates()
    description = args.config or "mid-size random model (bench/midsize.py)"
    if args.json:
        print(json.dumps({"model": description, "context": args.context, "cpu": cpu_rows, "gpu_estimate": gpu_rows},
                         indent=2))
    else:
        print_text(cpu_rows, gpu_rows, description, args.context)
    return 0


if __name__ == "__main__":
    sys.exit(main())

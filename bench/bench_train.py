"""Fine-tuning throughput and peak memory per training mode on this CPU, and the real model's GPU estimate.

    python bench/bench_train.py [--config CFG] [--modes projection,qformer,lora] [--iterations 12]
                                [--batch-size 2] [--threads 1] [--json]

Part 1 (this CPU, measured): for each mode a fresh Python process builds a ``Trainer`` on the
mid-size random model of ``bench/midsize.py`` (default) with the three ``examples/`` radiographs
(report captions, XrayGPT's random crop), runs ``--iterations`` optimiser steps in float32, and
reports the median samples/s and target tokens/s of ``metrics.jsonl`` over the steps after the
first (warm-up), its resident set after loading the model and its peak (``ru_maxrss``), and the
peak minus the after-load figure (what training adds). Modes: ``projection`` (XrayGPT's default:
``llama_proj`` only), ``qformer`` (+ Q-Former and query tokens), ``lora`` (+ LoRA r 8 on q/v, with
gradient checkpointing). QLoRA needs a CUDA GPU and is not run here.

Part 2 (a GPU, estimated, not measured): ``xraygpt check --train``'s estimate for the real model
(``eval_configs/xraygpt_eval.yaml``; Vicuna-7B dimensions when its folder is absent).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import midsize  # noqa: E402

REAL_CONFIG = midsize.REPO / "eval_configs" / "xraygpt_eval.yaml"
MODES = {"projection": [], "qformer": ["train.train_qformer=true"], "lora": ["train.lora.enabled=true"]}
CAPTIONS = {
    "nih_cxr14_00000001_000_pa_512.png": "The heart is normal in size. The mediastinum is unremarkable. "
                                         "The lungs are clear. No pleural effusion or pneumothorax.",
    "hannover_1479fa94_pa_640x755.png": "There is a moderate right pleural effusion with adjacent atelectasis. "
                                        "No pneumothorax. Cardiomediastinal silhouette is within normal limits.",
    "hannover_00870a9c_ap_bedside_640x524.png": "Portable AP view. Support lines in place. Patchy bibasilar "
                                                "opacities, likely atelectasis. No large effusion.",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a project YAML config (default: build the mid-size random model)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated training modes")
    parser.add_argument("--iterations", type=int, default=12, help="optimiser steps per mode")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared 2-core machine: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", metavar="MODE", help=argparse.SUPPRESS)  # internal: measure one mode
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def write_data(folder: Path) -> Path:
    rows = [{"image": str(midsize.REPO / "examples" / name), "caption": caption} for name, caption in CAPTIONS.items()]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def measure(args: argparse.Namespace) -> dict:
    """One mode, in this process: load, train, read the figures back from metrics.jsonl."""
    import torch

    from xraygpt_app.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        overrides = [*MODES[args.child], f"train.batch_size={args.batch_size}", "train.val_fraction=0",
                     "train.report_samples=0", f"train.iters_per_epoch={args.iterations}", "train.max_epoch=1"]
        trainer = Trainer.from_config(args.config, data=args.data, overrides=overrides, output=out)
        loaded = rss_bytes()
        trainer.fit()
        steps = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = [s for s in steps if s["type"] == "train"][1:]  # the first step warms up
    trainable = sum(p.numel() for p in trainer.family.named_trainable().values())
    return {"mode": args.child, "trainable_parameters": trainable, "batch_size": args.batch_size,
            "samples_per_s": statistics.median(s["samples_per_s"] for s in timed),
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed),
            "rss_after_load_bytes": loaded, "peak_rss_bytes": peak, "training_adds_bytes": peak - loaded}


def run_child(mode: str, config: Path, data: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--config", str(config), "--data", str(data),
               "--iterations", str(args.iterations), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def gpu_estimates() -> dict:
    from xraygpt_app.config import load_config
    from xraygpt_app.memory import TRAIN_MODES, TrainShape, estimate_training

    config = load_config(REAL_CONFIG)
    return {mode: estimate_training(config, mode, TrainShape()) for mode in TRAIN_MODES}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(args.config) if args.config else midsize.build_midsize(Path(tmp) / "model")
        data = write_data(Path(tmp))
        measured = [run_child(mode, config, data, args) for mode in args.modes.split(",")]
    estimates = gpu_estimates()
    if args.json:
        gpu = {m: {"peak_bytes": r.peak["cuda:0"], "breakdown_bytes": r.breakdown["cuda:0"]}
               for m, r in estimates.items()}
        print(json.dumps({"cpu_measured": measured, "gpu_estimated_real_model": gpu}, indent=2))
        return 0
    gib = 2**30
    print(f"CPU, float32, mid-size model, batch {args.batch_size}, {args.iterations} steps, {args.threads} thread(s)"
          " (measured; median over steps 2..N):")
    print(f"{'mode':<11} {'trainable':>10} {'samples/s':>10} {'tokens/s':>9} {'RSS loaded':>11} {'peak RSS':>9}"
          f" {'training adds':>14}")
    for m in measured:
        print(f"{m['mode']:<11} {m['trainable_parameters']:>10,} {m['samples_per_s']:>10.2f} {m['tokens_per_s']:>9.1f}"
              f" {m['rss_after_load_bytes'] / gib:>9.2f} G {m['peak_rss_bytes'] / gib:>7.2f} G"
              f" {m['training_adds_bytes'] / gib:>12.2f} G")
    print("QLoRA: CUDA only, not run on the CPU.")
    print("\nReal XrayGPT on a CUDA GPU, batch 1, 160 target tokens (ESTIMATED from meta-device sizes, not measured):")
    for mode, result in estimates.items():
        parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in result.breakdown["cuda:0"].items() if v)
        print(f"  {mode:<16} {result.peak['cuda:0'] / gib:6.2f} GiB  ({parts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The steps of ``bench/device_check.sh``: one GPU check of the real-size model, one step per process.

    python bench/device_check.py STEP --out DIR [--dry-run] [--quick] [--vllm-python PY]
    STEP: build | mode MODE | agreement | medclip | vllm | report | modes (prints the mode names)

Each step writes ``DIR/rows/<name>.json``; ``report`` merges them into ``DIR/device_check.json`` and
``DIR/device_check.md`` (a step that failed or was skipped says so in its row). ``--dry-run`` runs
every step on the CPU with mid-size dims (``DRY_SCALE``), fp32 standing in for fp16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsize  # noqa: E402  (also puts tests/ on sys.path)

REPO = realsize.midsize.REPO
TINY_CONFIG = REPO / "eval_configs" / "tiny_fixture.yaml"
DRY_SCALE = 0.1
MODES = ("fp16", "fp16-compile", "4bit", "8bit", "low_resource")  # fast paths first
QUICK_MODES = ("fp16", "8bit")  # --quick: the rows a short device loan must give (with vllm), in under 8 minutes
QUICK_TURNS = 3  # --quick: turns per conversation instead of 8
TURNS = ("Could you provide a detailed description of the given x-ray image?",
         "Is there evidence of pleural effusion?", "Is the heart size normal?", "Any pneumothorax?",
         "Are the costophrenic angles sharp?", "Is there consolidation in either lung?",
         "Are there any lines or tubes?", "What is the overall impression?")
GB = 1e9


def setup(args: argparse.Namespace) -> tuple[str, float, Path]:
    """(device, scale, checkpoint folder) for this run."""
    device = "cpu" if args.dry_run else "cuda"
    scale = DRY_SCALE if args.dry_run else 1.0
    return device, scale, args.out / "cache" / f"realsize-{scale:g}"


def write_row(args: argparse.Namespace, name: str, row: dict) -> None:
    (args.out / "rows").mkdir(parents=True, exist_ok=True)
    (args.out / "rows" / f"{name}.json").write_text(json.dumps(row, indent=1))


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), the bound decode is held to."""
    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * nbytes * repeats / (time.perf_counter() - started)


def weight_bytes_per_token(llm) -> int:
    """Bytes a decode step reads: every LLM weight except the input embedding (one row of it is read)."""
    from xraygpt_app.memory import tensor_bytes

    embedding = llm.get_input_embeddings().weight
    return tensor_bytes(llm) - embedding.numel() * embedding.element_size()


def conversation(xray, image, reuse_kv: bool, new_tokens: int, turns: int = len(TURNS)
                 ) -> tuple[list[dict], list[list[int]]]:
    """Eight (or ``turns``) greedy turns of ``new_tokens`` tokens each: per turn its prompt size, TTFT, decode
    speed; the ids."""
    session = xray.chat(image, reuse_kv=reuse_kv)
    greedy = {"do_sample": False, "max_new_tokens": new_tokens, "min_length": new_tokens}
    rows, ids = [], []
    for question in TURNS[:turns]:
        turn = session.ask(question, **greedy)
        t = turn.timings
        ids.append(turn.token_ids)
        rows.append({"prompt_tokens": t["reused_tokens"] + t["prefilled_tokens"], "prefilled": t["prefilled_tokens"],
                     "ttft_s": t["time_to_first_token_s"],
                     "decode_tokens_per_s": (t["new_tokens"] - 1) / t["decode_s"] if t["decode_s"] else None})
    return rows, ids


def mode_overrides(args: argparse.Namespace, mode: str) -> tuple[str, list[str]]:
    """(runtime mode, extra overrides) of a device-check mode name."""
    runtime = mode.removesuffix("-compile")
    if runtime == "fp16" and args.dry_run:
        # fp16 needs CUDA. float32 stands in, so KV reuse must give exactly the recomputed tokens; in bfloat16
        # the random mid-size model's near-ties can part the two conversations by rounding alone.
        runtime = "fp32"
    extra = ["runtime.compile=true"] if mode.endswith("-compile") else []
    return runtime, extra


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    """Load one mode, measure memory against the estimate, TTFT over 8 turns (KV reuse / recompute), decode."""
    import torch
    from bench_memory import AnonPeak, held_after_gc

    from xraygpt_app.api import Assistant
    from xraygpt_app.config import load_config
    from xraygpt_app.memory import CUDA_CONTEXT_BYTES, HOST_BASELINE_BYTES, estimate

    device, scale, root = setup(args)
    runtime, extra = mode_overrides(args, mode)
    if args.dry_run:
        from xraygpt_app import kvcache

        kvcache.CPU_BACKEND = "aot_eager"  # the dry run checks the path, not inductor's minutes-long C++ build
    if runtime in ("8bit", "4bit", "low_resource") and not _has_bitsandbytes():
        return {"mode": mode, "skipped": "no bitsandbytes"}
    config = load_config(realsize.REAL_CONFIG, [*realsize.overrides(root, scale, runtime, device), *extra])
    planned = estimate(config, assume_cuda=device == "cuda")
    image = realsize.midsize.sample_image()
    anon_baseline, sampler = held_after_gc(), AnonPeak()
    started = time.perf_counter()
    xray = Assistant.from_config(config)
    synchronize(device)
    load_s = time.perf_counter() - started
    new_tokens = 4 if args.dry_run else 16
    turns = QUICK_TURNS if args.quick else len(TURNS)
    reuse, reuse_ids = conversation(xray, image, True, new_tokens, turns)
    full, full_ids = conversation(xray, image, False, new_tokens, turns)
    anon_peak = sampler.stop() - anon_baseline
    row = {"mode": mode, "runtime_mode": runtime, "device": device, "load_s": load_s,
           "ttft_reuse_s": [t["ttft_s"] for t in reuse], "ttft_full_s": [t["ttft_s"] for t in full],
           "prompt_tokens": [t["prompt_tokens"] for t in reuse], "prefilled_reuse": [t["prefilled"] for t in reuse],
           "decode_tokens_per_s": statistics.median(t["decode_tokens_per_s"] for t in reuse
                                                    if t["decode_tokens_per_s"]),
           "weight_bytes_per_token": weight_bytes_per_token(xray.model.llm),
           "identical_greedy_reuse_vs_full": reuse_ids == full_ids}
    if device == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated() + CUDA_CONTEXT_BYTES  # the estimate counts the context
        row["estimate_bytes"] = planned.peak["cuda:0"]
        free, total = torch.cuda.mem_get_info()
        row.update(max_reserved_bytes=torch.cuda.max_memory_reserved(), device_used_now_bytes=total - free)
    else:
        row["peak_bytes"] = anon_peak + HOST_BASELINE_BYTES  # the estimate counts the process baseline
        row["estimate_bytes"] = planned.peak["cpu"]
    bandwidth = copy_bandwidth(device, 2**30 if device == "cuda" else 2**28, 20 if device == "cuda" else 5)
    bound = bandwidth / row["weight_bytes_per_token"]
    row.update(copy_bandwidth_bytes_per_s=bandwidth, bandwidth_bound_tokens_per_s=bound,
               decode_vs_bound=row["decode_tokens_per_s"] / bound)
    return row


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def run_agreement(args: argparse.Namespace) -> dict:
    """Greedy tokens of the tiny fixture in fp16 (bf16 in the dry run) against fp32: identical, or where they part."""
    from xraygpt_app.api import Assistant

    if not TINY_CONFIG.is_file() or not (REPO.parent / "shared" / "fixtures" / "xraygpt_tiny").is_dir():
        return {"skipped": "the tiny fixture (../shared/fixtures/xraygpt_tiny) is not beside the repository"}
    device, _, _ = setup(args)
    half = "bf16" if args.dry_run else "fp16"
    image = realsize.midsize.sample_image()
    ids = {}
    for mode in (half, "fp32"):
        xray = Assistant.from_config(TINY_CONFIG, [f"runtime.mode={mode}", f"runtime.device={device}"])
        session = xray.chat(image)
        ids[mode] = [t for q in TURNS[:2] for t in session.ask(q, do_sample=False, max_new_tokens=32).token_ids]
    first = next((i for i, (a, b) in enumerate(zip(ids[half], ids["fp32"], strict=False)) if a != b), None)
    if first is None and len(ids[half]) != len(ids["fp32"]):
        first = min(len(ids[half]), len(ids["fp32"]))
    return {"compared": f"{half} vs fp32", "tokens": len(ids["fp32"]), "identical": first is None,
            "first_difference": first}


# The dry run's MedCLIP-ViT: Swin and BERT at about a quarter of their widths and fewer layers (same code path;
# the real size took 70 s of a 3-minute dry run on a busy 2-core machine).
DRY_MEDCLIP_SWIN = {"embed_dim": 48, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24]}
DRY_MEDCLIP_BERT = {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 768}


def write_medclip(folder: Path, dry_run: bool = False) -> tuple[Path, Path, Path]:
    """MedCLIP-ViT at its real dimensions (Swin-tiny, BERT-base, 512-d; mid-size in a dry run), random, saved as
    the released files."""
    import shutil

    import torch
    from transformers import BertConfig, SwinConfig

    from xraygpt_app.zeroshot.medclip import MedCLIP

    weights, bert, swin = folder / "pytorch_model.bin", folder / "bert", folder / "swin"
    if not weights.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        # SwinConfig() is swin-tiny-patch4-window7-224; Bio_ClinicalBERT is BERT-base with a 28996-token vocabulary.
        bert_config = BertConfig(vocab_size=28996, **(DRY_MEDCLIP_BERT if dry_run else {}))
        swin_config = SwinConfig(**(DRY_MEDCLIP_SWIN if dry_run else {}))
        bert_config.save_pretrained(bert)
        swin_config.save_pretrained(swin)
        for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(REPO.parent / "shared" / "fixtures" / "medclip_tiny" / "bert_tiny" / name, bert / name)
        model = MedCLIP("vit", bert_config, 512, swin_config)
        torch.save(model.state_dict(), weights)
    return weights, bert, swin


def run_medclip(args: argparse.Namespace) -> dict:
    """20 radiographs through the real-size MedCLIP-ViT (mid-size in a dry run), loaded by the production loader."""
    from xraygpt_app.zeroshot.classifier import ZeroShotClassifier
    from xraygpt_app.zeroshot.medclip import load_encoder

    if not (REPO.parent / "shared" / "fixtures" / "medclip_tiny").is_dir():
        return {"skipped": "the MedCLIP fixture's tokenizer (../shared/fixtures/medclip_tiny) is not present"}
    device, _, _ = setup(args)
    size = "mid-size" if args.dry_run else "real size"
    weights, bert, swin = write_medclip(args.out / "cache" / f"medclip-vit-{size.replace(' ', '-')}", args.dry_run)
    started = time.perf_counter()
    # The dry run samples 2 prompts per label (BERT-base encodes the full CheXpert-5 set in ~30 s on a CPU core).
    classifier = ZeroShotClassifier(load_encoder(weights, str(bert), str(swin), "vit", device), "medclip-vit",
                                    prompts_per_class=2 if args.dry_run else None)
    load_s = time.perf_counter() - started
    images = [realsize.midsize.sample_image()] * 20
    timings = []
    for _ in range(3):  # the first call encodes the prompts too; later ones take them from the cache
        started = time.perf_counter()
        classifier.classify(images, preset="chexpert5")
        synchronize(device)
        timings.append(time.perf_counter() - started)
    return {"images": 20, "size": size, "device": device, "load_s": load_s, "first_call_s": timings[0],
            "cached_prompts_s": min(timings[1:]), "ms_per_image": 1000 * min(timings[1:]) / 20}


def run_vllm_step(args: argparse.Namespace) -> dict:
    """vLLM serving the built Vicuna folder: decode tokens/s at 1 and 8 users against the bandwidth bound."""
    from device_vllm import run_vllm

    device, scale, root = setup(args)
    bandwidth = copy_bandwidth(device, 2**30 if device == "cuda" else 2**28, 20 if device == "cuda" else 5)
    return run_vllm(root, scale, device, args.vllm_python, 16 if args.dry_run else 128, bandwidth)


def build(args: argparse.Namespace) -> dict:
    _, scale, root = setup(args)
    started = time.perf_counter()
    realsize.build(root, scale, log=lambda text: print(text, file=sys.stderr, flush=True))
    return {"scale": scale, "folder": str(root), "build_s": time.perf_counter() - started}


def environment(dry_run: bool) -> dict:
    import torch
    import transformers

    info = {"dry_run": dry_run, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import bitsandbytes
        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("build", "mode", "agreement", "medclip", "vllm", "report", "modes"))
    parser.add_argument("mode", nargs="?", choices=MODES)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the short profile: fewer modes and turns")
    parser.add_argument("--vllm-python", default="", help="a Python with vllm for the vllm step (empty: skipped)")
    args = parser.parse_args(argv)
    modes = QUICK_MODES if args.quick else MODES
    if args.step == "modes":
        print(" ".join(modes))
        return 0
    if args.step == "report":
        from device_report import write_report

        return write_report(args.out, environment(args.dry_run), modes, args.quick)
    steps = {"build": build, "agreement": run_agreement, "medclip": run_medclip, "vllm": run_vllm_step}
    name = args.mode if args.step == "mode" else args.step
    row = run_mode(args, args.mode) if args.step == "mode" else steps[args.step](args)
    write_row(args, name, row)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())

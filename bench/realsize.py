"""Random Assistant checkpoints of the real sizes in the real formats, loaded through the production path.

    python bench/realsize.py [--scale 1.0] [--cache DIR] [--modes bf16,8bit] [--max-new-tokens 6] [--json]

Writes (once; reused when present) into a cache folder: LAVIS ``eva_vit_g.pth`` (EVA-g: 1408 wide,
39 blocks, 16 heads, MLP 6144, float16 plain state dict), a BLIP-2 ``{'model': ...}`` file (the
full BERT-base Q-Former with text branch and heads, float32), XrayGPT's checkpoint container
(``llama_proj`` 768 -> 4096 and the buffers its runner saves) and a Vicuna-7B Hugging Face folder
(4096 / 32 layers / 32 heads / 11008, vocabulary 32000, float16 safetensors shards with an index
file, a SentencePiece tokenizer of 32000 pieces). At ``--scale 1`` that is about 17 GB of disk.

Then, one fresh process per mode, it loads them with ``Assistant.from_config`` and the real default
config (``eval_configs/xraygpt_eval.yaml``; at scale 1 only the weight paths and the mode are
overridden) and reports load time, peak RSS and peak anonymous memory (``RssAnon`` sampled every
2 ms) against ``xraygpt check``'s estimate, and a greedy two-turn chat (time per stage, per token).

``--scale`` < 1 shrinks every width and depth (head sizes kept) so the same code runs in seconds
(the tests use it). The full size needs about 20 GiB of RAM for bf16 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import midsize  # noqa: E402  (puts tests/ on sys.path for tinymodels)
import tinymodels  # noqa: E402

REAL_CONFIG = midsize.REPO / "eval_configs" / "xraygpt_eval.yaml"
CPU_MODES = ("bf16", "8bit")
SHARD_BYTES = 2 * 10**9
LLAMA_HEAD_DIM, EVA_HEAD_DIM, BERT_HEAD_DIM = 128, 88, 64
VOCAB = 32000
QUESTIONS = ("Could you provide a detailed description of the given x-ray image?",
             "Is there evidence of pleural effusion?")


@dataclass(frozen=True)
class RealDims:
    """XrayGPT's real dimensions, or all widths and depths times ``scale`` (head sizes kept)."""

    scale: float = 1.0

    def _n(self, full: int, minimum: int = 1) -> int:
        return max(minimum, round(full * self.scale))

    def tiny(self) -> tinymodels.TinyDims:
        """As ``tests/tinymodels.TinyDims`` (field names of the tiny writers)."""
        q_heads = self._n(12, 2)
        llm_heads = self._n(32, 2)
        return tinymodels.TinyDims(
            image_size=224, patch_size=14, embed_dim=self._n(16, 2) * EVA_HEAD_DIM, depth=self._n(39, 2),
            vision_heads=self._n(16, 2), mlp_ratio=4.3637,
            q_hidden=q_heads * BERT_HEAD_DIM, q_layers=2 * self._n(6), q_heads=q_heads,
            q_intermediate=4 * q_heads * BERT_HEAD_DIM, q_queries=32, q_vocab=self._n(30522, 64), q_positions=512,
            cross_attention_freq=2, llm_hidden=llm_heads * LLAMA_HEAD_DIM, llm_layers=self._n(32, 2),
            llm_heads=llm_heads, llm_intermediate=64 * self._n(172, 2), llm_vocab=VOCAB, t5_width=self._n(4096, 64))


def default_cache(scale: float) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "xraygpt-app" / f"realsize-{scale:g}"


# --- writing -----------------------------------------------------------------------------------

def _random_like(name: str, shape: tuple[int, ...], dtype, generator):
    """A tensor for ``name``: LayerNorm/RMSNorm weights near 1, everything else ~ N(0, 0.02) (LLaMA's init)."""
    import torch

    tensor = torch.randn(shape, generator=generator, device=generator.device) * 0.02
    if len(shape) == 1 and name.endswith("weight") and "norm" in name.lower():
        tensor += 1.0
    return tensor.to(dtype).cpu()


def _generator(seed: int):
    """On a GPU when there is one: drawing 8 billion normals takes minutes on one CPU core, a second there."""
    import torch

    return torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)


def eva_shapes(dims: tinymodels.TinyDims) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of LAVIS's ``eva_vit_g.pth`` from timm's ``Eva`` built on the meta device."""
    import timm.models.eva
    import torch

    with torch.device("meta"):
        model = timm.models.eva.Eva(
            img_size=dims.image_size, patch_size=dims.patch_size, embed_dim=dims.embed_dim, depth=dims.depth,
            num_heads=dims.vision_heads, mlp_ratio=dims.mlp_ratio, qkv_bias=True, use_rot_pos_emb=False,
            use_abs_pos_emb=True, num_classes=0, global_pool="")
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("norm.")}


def llama_config(dims: tinymodels.TinyDims):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=dims.llm_hidden, intermediate_size=dims.llm_intermediate, num_hidden_layers=dims.llm_layers,
        num_attention_heads=dims.llm_heads, num_key_value_heads=dims.llm_heads, vocab_size=dims.llm_vocab,
        max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, torch_dtype="float16")


def llama_shapes(dims: tinymodels.TinyDims) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``LlamaForCausalLM``'s state dict, from the model built on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(dims))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def disk_bytes(dims: tinymodels.TinyDims) -> int:
    """Bytes the four files take: EVA and LLaMA in float16, BLIP-2 in float32."""
    def count(shapes):
        return sum(math.prod(s) for s in shapes.values())

    return 2 * count(eva_shapes(dims)) + 4 * count(tinymodels.blip2_shapes(dims)) + 2 * count(llama_shapes(dims))


def write_eva(path: Path, dims: tinymodels.TinyDims, seed: int = 0) -> None:
    import torch

    generator = _generator(seed)
    torch.save({k: _random_like(k, s, torch.float16, generator) for k, s in eva_shapes(dims).items()}, path)


def write_blip2(path: Path, dims: tinymodels.TinyDims, seed: int = 1) -> None:
    """The released layout (``tinymodels.blip2_shapes``), float32, with ``position_ids``."""
    import torch

    generator = _generator(seed)
    state = {k: _random_like(k, s, torch.float32, generator) for k, s in tinymodels.blip2_shapes(dims).items()}
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(dims.q_positions).unsqueeze(0)
    torch.save({"model": state}, path)


def write_llama(folder: Path, dims: tinymodels.TinyDims, seed: int = 3) -> None:
    """A float16 safetensors folder in shards of at most ``SHARD_BYTES`` plus index; one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(dims)
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        if groups[-1] and size + 2 * math.prod(shape) > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += 2 * math.prod(shape)
    generator = _generator(seed)
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: _random_like(k, shapes[k], torch.float16, generator) for k in keys}, folder / name,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    llama_config(dims).save_pretrained(folder)
    write_tokenizer(folder, dims.llm_vocab)


def write_tokenizer(folder: Path, pieces: int) -> None:
    """The fixture's LLaMA-style SentencePiece model grown to ``pieces`` pieces (LLaMA's 32000)."""
    from sentencepiece import sentencepiece_model_pb2

    tinymodels.copy_tokenizer(folder)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    lowest = min(p.score for p in proto.pieces)
    for n in range(pieces - len(proto.pieces)):  # rare whole words, never preferred over the fixture's pieces
        proto.pieces.add(piece=f"\u2581w{n}", score=lowest - 1 - n, type=1)
    proto.trainer_spec.vocab_size = pieces
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())


def build(root: Path, scale: float = 1.0, log=print) -> Path:
    """Write the four weight sources under ``root`` unless a complete set of these dims is there."""
    dims = RealDims(scale).tiny()
    marker = root / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(dims):
        log(f"reusing the real-size checkpoints in {root}")
        return root
    root.mkdir(parents=True, exist_ok=True)
    log(f"writing random checkpoints of scale {scale:g} to {root}: about {disk_bytes(dims) / 1e9:.2f} GB of disk")
    started = time.perf_counter()
    write_eva(root / "eva_vit_g.pth", dims)
    write_blip2(root / "blip2_pretrained_flant5xxl.pth", dims)
    import torch

    torch.save(tinymodels.xraygpt_checkpoint(dims), root / "xraygpt_pretrained.pth")
    write_llama(root / "Vicuna_Radiology_fp16", dims)
    marker.write_text(json.dumps(asdict(dims)))
    log(f"written in {time.perf_counter() - started:.0f} s")
    return root


def overrides(root: Path, scale: float, mode: str, device: str = "cpu") -> list[str]:
    """``--set`` values for the real default config: weight paths, mode and device, and (scale < 1) the dims."""
    sets = [f"weights.eva_vit_g={root / 'eva_vit_g.pth'}",
            f"weights.blip2_qformer={root / 'blip2_pretrained_flant5xxl.pth'}",
            f"weights.ckpt={root / 'xraygpt_pretrained.pth'}", f"weights.llama_model={root / 'Vicuna_Radiology_fp16'}",
            f"runtime.mode={mode}", f"runtime.device={device}"]
    if scale == 1.0:
        return sets
    dims = RealDims(scale).tiny()
    config = tinymodels.config_dict(dims, "", "", "", "")
    for section in ("vision", "qformer", "llm"):
        sets += [f"{section}.{k}={v}" for k, v in config[section].items()]
    return sets


# --- measuring ---------------------------------------------------------------------------------

def measure_mode(root: Path, scale: float, mode: str, max_new_tokens: int) -> dict:
    """In this (fresh) process: load one mode, chat two greedy turns, report times and memory."""
    import logging
    import resource

    from bench_memory import AnonPeak, anon_rss_bytes, held_after_gc, rss_bytes

    from xraygpt_app.api import Assistant
    from xraygpt_app.config import load_config
    from xraygpt_app.memory import estimate

    logging.basicConfig(level=logging.WARNING)
    image = midsize.sample_image()
    baseline, anon_baseline = rss_bytes(), held_after_gc()
    sampler = AnonPeak()
    config = load_config(REAL_CONFIG, overrides(root, scale, mode))
    result = estimate(config, assume_cuda=False)
    started = time.perf_counter()
    xray = Assistant.from_config(config)
    load_s = time.perf_counter() - started
    anon_load_peak, anon_loaded = sampler.peak, held_after_gc()
    session = xray.chat(image)
    greedy = {"do_sample": False, "max_new_tokens": max_new_tokens, "min_length": max_new_tokens}
    turns = [session.ask(q, **greedy) for q in QUESTIONS]
    anon_peak = sampler.stop()
    parts = result.breakdown["cpu"]
    used = turns[-1].timings["reused_tokens"] + turns[-1].timings["prefilled_tokens"] + max_new_tokens
    at_used = estimate(load_config(REAL_CONFIG, [*overrides(root, scale, mode), f"llm.max_length={used}"]),
                       assume_cuda=False)
    return {
        "mode": mode, "scale": scale, "load_s": load_s, "image": session.encoding.timings,
        "turns": [{**t.timings, "decode_s_per_token": t.timings["decode_s"] / max(1, t.timings["new_tokens"] - 1)}
                  for t in turns],
        "rss_baseline": baseline, "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "anon_baseline": anon_baseline, "anon_after_load": anon_loaded, "anon_load_peak": anon_load_peak,
        "anon_peak": anon_peak, "anon_now": anon_rss_bytes(),
        "estimate_total": result.peak["cpu"],
        "estimate_weights": parts["vision"] + parts["qformer"] + parts["llm_weights"],
        "estimate_breakdown": parts, "context_used": used, "estimate_total_at_used": at_used.peak["cpu"],
    }


def measure_vision(root: Path, scale: float, mode: str) -> dict:
    """Only EVA + Q-Former (no LLM): load, cast and place them as ``XrayGPTModel.load`` does, encode one image.

    At scale 1 this fits in about 5 GiB (the ViT in float32 on the CPU), where the whole model needs 20.
    """
    import torch
    from bench_memory import AnonPeak, held_after_gc

    from xraygpt_app.config import load_config
    from xraygpt_app.families.xraygpt.model import load_vision_and_bridge, resolve_model_weights
    from xraygpt_app.families.xraygpt.qformer import cast_bridge
    from xraygpt_app.families.xraygpt.vision import place_vision, preprocess
    from xraygpt_app.memory import estimate
    from xraygpt_app.placement import plan_placement

    config = load_config(REAL_CONFIG, overrides(root, scale, mode))
    parts = estimate(config, assume_cuda=False).breakdown["cpu"]
    placement = plan_placement(config.runtime, config.vision)
    anon_baseline, sampler = held_after_gc(), AnonPeak()
    started = time.perf_counter()
    vision, bridge, _ = load_vision_and_bridge(config, resolve_model_weights(config))
    vision, bridge = place_vision(vision, placement), cast_bridge(bridge, placement)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    with torch.inference_mode():
        bridge(vision(preprocess(midsize.sample_image(), config.vision)).float())
    return {"mode": mode, "load_s": load_s, "encode_s": time.perf_counter() - started,
            "anon_after_load": held_after_gc() - anon_baseline, "anon_peak": sampler.stop() - anon_baseline,
            "estimate_weights": parts["vision"] + parts["qformer"]}


def run_modes(root: Path, scale: float, modes: list[str], max_new_tokens: int) -> list[dict]:
    """One subprocess per mode, so one mode's allocations cannot hide another's peak."""
    from bench_memory import child_json

    return [child_json([__file__, "--child", mode, "--cache", str(root), "--scale", str(scale),
                        "--max-new-tokens", str(max_new_tokens)], mode) for mode in modes]


def print_rows(rows: list[dict]) -> None:
    gib = 2**30
    print("memory (GiB): RSS = whole resident set (ru_maxrss, incl. mapped checkpoint pages); anon = RssAnon"
          " (sampled every 2 ms) above the baseline after imports;\n  estimate = xraygpt check on the CPU:"
          " weights, and tensors = total minus the 1 GiB process allowance (weights + KV cache + activations)"
          " for the config's context (2000) and for the context the chat used")
    print(f"  {'mode':<6}{'load s':>8}{'RSS peak':>9}{'anon load':>10}{'anon peak':>10}{'est. weights':>13}"
          f"{'est. tensors':>13}{'(at used)':>10}{'peak/weights':>13}{'est/peak':>9}")
    for row in rows:
        if "error" in row:
            print(f"  {row['mode']:<6} failed: {row['error']}")
            continue
        peak = row["anon_peak"] - row["anon_baseline"]
        overhead = row["estimate_breakdown"]["overhead"]
        tensors, at_used = row["estimate_total"] - overhead, row["estimate_total_at_used"] - overhead
        print(f"  {row['mode']:<6}{row['load_s']:>8.1f}{row['rss_peak'] / gib:>9.2f}"
              f"{(row['anon_after_load'] - row['anon_baseline']) / gib:>10.2f}{peak / gib:>10.2f}"
              f"{row['estimate_weights'] / gib:>13.2f}{tensors / gib:>13.2f}{at_used / gib:>10.2f}"
              f"{peak / row['estimate_weights']:>13.2f}{at_used / peak:>9.2f}")
    print("chat (greedy, s): vision, Q-Former; per turn: prompt tokens (prefilled), time to first token,"
          " decode per token")
    for row in rows:
        if "error" in row:
            continue
        turns = "; ".join(f"turn {i + 1}: {t['reused_tokens'] + t['prefilled_tokens']} ({t['prefilled_tokens']}) tok,"
                          f" TTFT {t['time_to_first_token_s']:.2f}, {t['decode_s_per_token']:.3f}/tok"
                          for i, t in enumerate(row["turns"]))
        image = row["image"]
        print(f"  {row['mode']:<6} vision {image['vision_s']:.2f}, Q-Former {image['qformer_s']:.2f}; {turns}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1 = the real sizes; smaller shrinks every dim")
    parser.add_argument("--cache", type=Path, help="where the checkpoints go (default ~/.cache/xraygpt-app/...)")
    parser.add_argument("--modes", default=",".join(CPU_MODES), help="comma-separated runtime modes (CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--build-only", action="store_true", help="write the checkpoints and stop")
    parser.add_argument("--vision-only", action="store_true",
                        help="load and run only EVA + Q-Former (bf16 mode's placement): about 5 GiB at scale 1")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", metavar="MODE", help=argparse.SUPPRESS)  # internal: measure one mode
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.cache or default_cache(args.scale)
    if args.child:
        print(json.dumps(measure_mode(root, args.scale, args.child, args.max_new_tokens)))
        return 0
    build(root, args.scale, log=lambda text: print(text, file=sys.stderr, flush=True))
    if args.build_only:
        return 0
    if args.vision_only:
        row = measure_vision(root, args.scale, "bf16")
        print(json.dumps(row, indent=1) if args.json else
              f"EVA + Q-Former (bf16 placement: ViT float32 on the CPU): load {row['load_s']:.1f} s, one image"
              f" {row['encode_s']:.2f} s; RssAnon after load {row['anon_after_load'] / 2**30:.2f} GiB, peak"
              f" {row['anon_peak'] / 2**30:.2f} GiB; estimate (weights) {row['estimate_weights'] / 2**30:.2f} GiB")
        return 0
    rows = run_modes(root, args.scale, [m.strip() for m in args.modes.split(",") if m.strip()], args.max_new_tokens)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_rows(rows)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

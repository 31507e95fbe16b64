"""Tiny XrayGPT parts of the real architectures, written in the real native file formats.

Everything is built with the reference library classes or in the exact key layout of the
released files, so the production loaders read them through their normal path:

- ``eva_vit_g.pth`` (LAVIS): a plain state dict of timm's ``Eva`` in float16, without the final
  norm that LAVIS comments out;
- ``blip2_pretrained_*.pth`` (LAVIS): ``{'model': ...}`` with the full BERT Q-Former (text branch,
  cross-attention every ``cross_attention_freq`` layers, ``*_query`` FFN), ``Qformer.cls.*``,
  ``query_tokens``, ``ln_vision.*`` and a stage-2 ``t5_proj`` head (the layout of the fixture's
  ``blip2_tiny.pth``);
- XrayGPT's checkpoint ``{'model', 'optimizer', 'config', 'scaler', 'epoch'}`` holding
  ``llama_proj`` plus the buffers its runner saves;
- a Hugging Face LLaMA folder from ``LlamaForCausalLM.save_pretrained`` (safetensors), or the
  older sharded ``pytorch_model-0000i-of-0000n.bin`` layout (optionally with the rotary
  ``inv_freq`` buffers that transformers <= 4.30 saved), with the fixture's SentencePiece tokenizer.

Random weights, no downloads. ``build_all`` writes a complete set plus a YAML config.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import timm.models.eva
import torch
import yaml
from helpers import SHARED
from transformers import LlamaConfig, LlamaForCausalLM

FIXTURE = SHARED / "fixtures" / "xraygpt_tiny"  # callers hold the shared_dir fixture (conftest)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TinyDims:
    """Every dimension of a tiny XrayGPT (names as in the project's config sections)."""

    image_size: int = 56
    patch_size: int = 14
    embed_dim: int = 32
    depth: int = 2
    vision_heads: int = 2
    mlp_ratio: float = 4.3637
    q_hidden: int = 32
    q_layers: int = 2
    q_heads: int = 4
    q_intermediate: int = 64
    q_queries: int = 4
    q_vocab: int = 64  # text branch only: dropped at inference
    q_positions: int = 32
    cross_attention_freq: int = 2
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_intermediate: int = 128
    llm_vocab: int = 1000  # the fixture tokenizer's size
    t5_width: int = 48

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


QUANT_DIMS = TinyDims(llm_hidden=128, llm_intermediate=256, llm_heads=2)  # multiples of 64 for 4-bit blocks


def _randomize(tensors: dict[str, torch.Tensor], generator: torch.Generator, std: float = 0.05) -> None:
    """Fill every float tensor in place: LayerNorm-like weights near 1, everything else near 0."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator) * std
        norm_weight = tensor.dim() == 1 and name.endswith("weight") and ("norm" in name.lower())
        tensor.copy_(noise + 1.0 if norm_weight else noise)


def eva_state_dict(dims: TinyDims = TinyDims(), seed: int = 0) -> StateDict:
    """LAVIS ``eva_vit_g.pth`` layout from timm's ``Eva``: float16, no final norm, q/v bias only."""
    model = timm.models.eva.Eva(
        img_size=dims.image_size, patch_size=dims.patch_size, embed_dim=dims.embed_dim, depth=dims.depth,
        num_heads=dims.vision_heads, mlp_ratio=dims.mlp_ratio, qkv_bias=True, use_rot_pos_emb=False,
        use_abs_pos_emb=True, num_classes=0, global_pool="")
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("norm.")}
    generator = torch.Generator().manual_seed(seed)
    _randomize(state, generator, std=0.1)
    return {k: v.half() for k, v in state.items()}


def _bert_block(prefix: str, hidden: int, inter: int, kv_width: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one BERT attention block (self or cross) as LAVIS names it."""
    return {
        f"{prefix}.self.query.weight": (hidden, hidden), f"{prefix}.self.query.bias": (hidden,),
        f"{prefix}.self.key.weight": (hidden, kv_width), f"{prefix}.self.key.bias": (hidden,),
        f"{prefix}.self.value.weight": (hidden, kv_width), f"{prefix}.self.value.bias": (hidden,),
        f"{prefix}.output.dense.weight": (hidden, hidden), f"{prefix}.output.dense.bias": (hidden,),
        f"{prefix}.output.LayerNorm.weight": (hidden,), f"{prefix}.output.LayerNorm.bias": (hidden,),
    }


def _ffn(prefix_in: str, prefix_out: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix_in}.dense.weight": (inter, hidden), f"{prefix_in}.dense.bias": (inter,),
        f"{prefix_out}.dense.weight": (hidden, inter), f"{prefix_out}.dense.bias": (hidden,),
        f"{prefix_out}.LayerNorm.weight": (hidden,), f"{prefix_out}.LayerNorm.bias": (hidden,),
    }


def blip2_shapes(dims: TinyDims = TinyDims()) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a LAVIS BLIP-2 stage-1 file (float tensors; ``position_ids`` added separately)."""
    h, inter = dims.q_hidden, dims.q_intermediate
    shapes: dict[str, tuple[int, ...]] = {
        "Qformer.bert.embeddings.word_embeddings.weight": (dims.q_vocab, h),
        "Qformer.bert.embeddings.position_embeddings.weight": (dims.q_positions, h),
        "Qformer.bert.embeddings.LayerNorm.weight": (h,), "Qformer.bert.embeddings.LayerNorm.bias": (h,),
    }
    for i in range(dims.q_layers):
        layer = f"Qformer.bert.encoder.layer.{i}"
        shapes.update(_bert_block(f"{layer}.attention", h, inter, h))
        if i % dims.cross_attention_freq == 0:
            shapes.update(_bert_block(f"{layer}.crossattention", h, inter, dims.embed_dim))
        shapes.update(_ffn(f"{layer}.intermediate", f"{layer}.output", h, inter))
        shapes.update(_ffn(f"{layer}.intermediate_query", f"{layer}.output_query", h, inter))
    shapes.update({
        "Qformer.cls.predictions.bias": (dims.q_vocab,),
        "Qformer.cls.predictions.transform.dense.weight": (h, h),
        "Qformer.cls.predictions.transform.dense.bias": (h,),
        "Qformer.cls.predictions.transform.LayerNorm.weight": (h,),
        "Qformer.cls.predictions.transform.LayerNorm.bias": (h,),
        "Qformer.cls.predictions.decoder.weight": (dims.q_vocab, h),
        "Qformer.cls.predictions.decoder.bias": (dims.q_vocab,),
        "query_tokens": (1, dims.q_queries, h),
        "ln_vision.weight": (dims.embed_dim,), "ln_vision.bias": (dims.embed_dim,),
        "t5_proj.weight": (dims.t5_width, h), "t5_proj.bias": (dims.t5_width,),
    })
    return shapes


def blip2_state_dict(dims: TinyDims = TinyDims(), seed: int = 1) -> StateDict:
    """The ``model`` entry of a LAVIS BLIP-2 file, random float32 tensors in the exact key layout."""
    state = {k: torch.zeros(shape) for k, shape in blip2_shapes(dims).items()}
    _randomize(state, torch.Generator().manual_seed(seed), std=0.1)
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(dims.q_positions).unsqueeze(0)
    return dict(sorted(state.items(), key=lambda kv: not kv[0].endswith("position_ids")))


def rotary_inv_freq(dims: TinyDims, base: float = 10000.0) -> torch.Tensor:
    """LLaMA's rotary inverse frequencies for one head (what the old transformers saved)."""
    head_dim = dims.llm_hidden // dims.llm_heads
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def xraygpt_checkpoint(dims: TinyDims = TinyDims(), seed: int = 2, extra: StateDict | None = None) -> dict:
    """XrayGPT's runner output: trained ``llama_proj`` plus every buffer, in its container."""
    generator = torch.Generator().manual_seed(seed)
    model: StateDict = {"Qformer.bert.embeddings.position_ids": torch.arange(dims.q_positions).unsqueeze(0)}
    for i in range(dims.llm_layers):
        model[f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = rotary_inv_freq(dims)
    model["llama_proj.weight"] = torch.randn(dims.llm_hidden, dims.q_hidden, generator=generator) * 0.5
    model["llama_proj.bias"] = torch.randn(dims.llm_hidden, generator=generator) * 0.1
    model.update(extra or {})
    config = {"model": {"arch": "mini_gpt4", "num_query_token": dims.q_queries, "vit_precision": "fp16",
                        "low_resource": True, "end_sym": "###"}}
    return {"model": model, "optimizer": {}, "config": config, "scaler": None, "epoch": 9}


def llama(dims: TinyDims = TinyDims(), seed: int = 3) -> LlamaForCausalLM:
    """A random ``LlamaForCausalLM`` whose weights are float16-representable (Vicuna ships fp16)."""
    config = LlamaConfig(
        hidden_size=dims.llm_hidden, intermediate_size=dims.llm_intermediate, num_hidden_layers=dims.llm_layers,
        num_attention_heads=dims.llm_heads, num_key_value_heads=dims.llm_heads, vocab_size=dims.llm_vocab,
        max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, initializer_range=0.15)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model


def copy_tokenizer(folder: Path) -> None:
    """The fixture's LLaMA-style SentencePiece tokenizer (1000 pieces, byte fallback)."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURE / "vicuna_tiny" / name, folder / name)


def save_llama_safetensors(model: LlamaForCausalLM, folder: Path) -> Path:
    """``save_pretrained`` in float16 (safetensors), plus the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    copy_tokenizer(folder)
    return folder


def save_llama_sharded_bin(model: LlamaForCausalLM, folder: Path, shards: int = 8, inv_freq: bool = False,
                           drop: tuple[str, ...] = (), extra: StateDict | None = None) -> Path:
    """The pre-safetensors layout of Vicuna folders: ``pytorch_model-0000i-of-0000n.bin`` + index.

    ``inv_freq`` adds each layer's rotary buffer, as transformers <= 4.30 saved it; ``drop`` and
    ``extra`` remove or add tensors (to test the loader's key checks).
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().clone() for k, v in model.state_dict().items()}
    if inv_freq:
        dims_head = model.config.hidden_size // model.config.num_attention_heads
        freq = 1.0 / (10000.0 ** (torch.arange(0, dims_head, 2, dtype=torch.float32) / dims_head))
        for i in range(model.config.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = freq.clone()
    state = {k: v for k, v in state.items() if k not in drop} | (extra or {})
    names = list(state)
    weight_map = {}
    for index in range(shards):
        part = names[index::shards]
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index_json, indent=2))
    model.config.save_pretrained(folder)
    copy_tokenizer(folder)
    return folder


@dataclass
class TinyModels:
    """Paths of one complete tiny XrayGPT, its config, and the in-memory reference parts."""

    root: Path
    config: Path
    eva: Path
    blip2: Path
    ckpt: Path
    llm_dir: Path
    dims: TinyDims
    llm: LlamaForCausalLM = field(repr=False)
    overrides: dict = field(default_factory=dict)


def config_dict(dims: TinyDims, eva: str, blip2: str, ckpt: str, llm_dir: str, mode: str = "fp32") -> dict:
    """A project YAML config (as a mapping) for ``dims`` and the given weight sources."""
    return {
        "vision": {"image_size": dims.image_size, "patch_size": dims.patch_size, "embed_dim": dims.embed_dim,
                   "depth": dims.depth, "num_heads": dims.vision_heads, "mlp_ratio": dims.mlp_ratio},
        "qformer": {"hidden_size": dims.q_hidden, "num_hidden_layers": dims.q_layers,
                    "num_attention_heads": dims.q_heads, "intermediate_size": dims.q_intermediate,
                    "num_query_tokens": dims.q_queries, "cross_attention_freq": dims.cross_attention_freq,
                    "max_position_embeddings": dims.q_positions, "vocab_size": dims.q_vocab},
        "llm": {"hidden_size": dims.llm_hidden},
        "generation": {"max_new_tokens": 12},
        "runtime": {"mode": mode},
        "weights": {"ckpt": ckpt, "llama_model": llm_dir, "eva_vit_g": eva, "blip2_qformer": blip2},
    }


def build_all(root: Path, dims: TinyDims = TinyDims(), llm_format: str = "safetensors",
              ckpt_extra: StateDict | None = None, mode: str = "fp32") -> TinyModels:
    """Write EVA, BLIP-2, XrayGPT ckpt, a LLaMA folder and ``tiny.yaml`` (relative paths) under ``root``.

    ``llm_format``: ``safetensors``, ``bin`` (8 shards) or ``bin-inv-freq`` (8 shards with rotary buffers).
    """
    root.mkdir(parents=True, exist_ok=True)
    torch.save(eva_state_dict(dims), root / "eva_vit_g.pth")
    torch.save({"model": blip2_state_dict(dims)}, root / "blip2_pretrained.pth")
    torch.save(xraygpt_checkpoint(dims, extra=ckpt_extra), root / "xraygpt_ckpt.pth")
    model = llama(dims)
    llm_dir = root / "vicuna"
    if llm_format == "safetensors":
        save_llama_safetensors(model, llm_dir)
    else:
        save_llama_sharded_bin(model, llm_dir, shards=8, inv_freq=llm_format == "bin-inv-freq")
    cfg = config_dict(dims, "eva_vit_g.pth", "blip2_pretrained.pth", "xraygpt_ckpt.pth", "vicuna", mode)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return TinyModels(root, config, root / "eva_vit_g.pth", root / "blip2_pretrained.pth", root / "xraygpt_ckpt.pth",
                      llm_dir, dims, model)


def with_dims(**changes) -> TinyDims:
    """``TinyDims`` with some fields changed."""
    return replace(TinyDims(), **changes)


def with_vocabulary(model: LlamaForCausalLM, rows: int, extra_rows: torch.Tensor | None = None) -> LlamaForCausalLM:
    """A copy of ``model`` with ``rows`` embedding and output rows (a padded or cropped vocabulary).

    The first rows are ``model``'s; padding rows get ``extra_rows`` in the output layer (to make
    them win the argmax) or small random values.
    """
    config = model.config.__class__.from_dict({**model.config.to_dict(), "vocab_size": rows})
    padded = LlamaForCausalLM(config).eval()
    state = dict(model.state_dict())
    keep = min(rows, model.config.vocab_size)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        full = padded.state_dict()[name].clone().half().float()
        full[:keep] = state[name][:keep]
        if name == "lm_head.weight" and extra_rows is not None:
            full[keep:keep + len(extra_rows)] = extra_rows
        state[name] = full
    padded.load_state_dict(state)
    return padded

"""Estimate peak memory per device for a config's runtime mode, from the model built on the meta device.

Nothing is allocated and no weights are read: the vision tower, the Q-Former bridge and the LLM
are built on ``torch.device("meta")`` with the configured dimensions (the LLM's from its folder's
``config.json``), cast or quantised the way loading would place them (``placement.plan_placement``),
and their tensors' bytes are summed. On top come the KV cache at the full context and documented
allowances for activations and runtime overhead.

What each part counts:

- **vision**: EVA ViT + ``ln_vision``. XrayGPT's ``vit_precision: fp16`` on CUDA keeps the Conv and
  Linear weights (and their biases) in float16 and everything else (LayerNorms, ``cls_token``,
  ``pos_embed``, ``q_bias``/``v_bias``) in float32; on the CPU (``low_resource``, fp32, bf16) the
  rounded weights are computed in float32 (bf16 if ``vision.precision`` is fp32 and mode bf16).
- **qformer**: Q-Former, query tokens and ``llama_proj`` next to the LLM, cast by ``qformer.cast_bridge``
  (float32; Linear weights float16 on CUDA, where the reference's autocast computes them in float16).
- **llm_weights**: unquantised parameters and buffers in the LLM dtype. 8-bit: transformers'
  bitsandbytes integration swaps every ``nn.Linear`` except the modules its quantizer skips
  (``get_modules_to_not_convert``: the output embedding ``lm_head``, tied weights, the last
  module) for ``Linear8bitLt``: int8 weights plus one float32 scale per output row (``SCB``).
  Embeddings are not Linear, so they stay in the LLM dtype. NF4 4-bit: half a byte per weight
  plus one float32 ``absmax`` per block of 64 (with double quantisation: one byte per block plus
  a float32 per 256 blocks) and a 16-entry code book per layer. We apply transformers' own
  replacement function to the meta model, so its skip rules are the ones counted.
- **kv_cache**: keys and values of every layer for ``min(llm.max_length, max_position_embeddings)``
  tokens (times ``generation.num_beams``), in the LLM compute dtype.
- **activations**: the largest transient of a prefill over the full context with SDPA attention
  (no n x n score matrix): one layer's MLP and attention tensors (the chat engine keeps only the
  last position's logits, ``logits_to_keep=1``), plus the residual stream; bitsandbytes' int8
  matmul adds an int32 accumulator. The ViT's one-image activations go on the vision device.
- **overhead**: on a GPU, ``CUDA_CONTEXT_BYTES`` for the CUDA context, kernels and cuBLAS
  workspace (not visible to ``torch.cuda.max_memory_allocated`` but visible to ``nvidia-smi``);
  on the CPU, ``HOST_BASELINE_BYTES`` for Python with torch/transformers/timm imported (the ViT is
  converted and moved tensor by tensor, so no float32 copy of it is made on the way to a GPU).
  Page-cache pages of memory-mapped checkpoint files are not counted (reclaimable, shared).

It is an estimate: allocator fragmentation, cuDNN/cuBLAS autotuning buffers and a different
attention kernel can move the real peak by a few hundred MB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, PretrainedConfig

from .config import RUNTIME_MODES, Config, RuntimeConfig
from .errors import MissingWeightsError, XrayGPTError
from .families.registry import family_spec
from .placement import Placement, plan_placement
from .weights import resolve_weights

log = logging.getLogger(__name__)

MiB = 2**20
CUDA_CONTEXT_BYTES = 512 * MiB  # typical CUDA 12/13 context + kernels + cuBLAS workspace with torch
HOST_BASELINE_BYTES = 1024 * MiB  # RSS after importing xraygpt_app, torch (CUDA build), transformers: 1.04 GiB
NF4_BLOCKSIZE = 64  # bitsandbytes' default blocksize for 4-bit quantisation
DOUBLE_QUANT_BLOCKSIZE = 256
PARTS = ("vision", "qformer", "llm_weights", "kv_cache", "activations", "overhead")



@dataclass
class MemoryEstimate:
    """Bytes per device and part (see the module docstring), and notes on what was assumed."""

    mode: str
    breakdown: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> dict[str, int]:
        return {device: sum(parts.values()) for device, parts in self.breakdown.items()}


def estimate_peak_memory(config: Config, assume_cuda: bool | None = None) -> dict[str, int]:
    """Estimated peak bytes per device (``"cuda:0"``, ``"cpu"``) for ``config.runtime``.

    ``assume_cuda``: plan as if a CUDA GPU were (True) or were not (False) present; None asks torch.
    """
    return estimate(config, assume_cuda).peak


def estimate_breakdown(config: Config, assume_cuda: bool | None = None) -> dict[str, dict[str, int]]:
    """Estimated bytes per device and part: vision, qformer, llm_weights, kv_cache, activations, overhead."""
    return estimate(config, assume_cuda).breakdown


def estimate(config: Config, assume_cuda: bool | None = None) -> MemoryEstimate:
    """The full estimate: breakdown per device, the resolved mode, and notes on assumptions."""
    placement = plan_placement(config.runtime, config.vision, cuda_available=assume_cuda)
    llm_config, notes = llm_architecture(config)
    vision_bytes, bridge_bytes, vision_activations = family_spec(config.model.family).load("image_memory")(
        config, placement, llm_config, notes)
    remote = config.runtime.llm_backend == "vllm"  # the LLM's layers and KV cache are the vLLM server's
    if remote:
        llm_bytes = llm_config.vocab_size * llm_config.hidden_size * placement.llm_dtype.itemsize
        notes.append("runtime.llm_backend vllm: of the LLM only its token embeddings are counted (the app keeps those);"
                     " its weights and KV cache are the vLLM server's (llm_server.launch.kv_cache_bytes)")
    else:
        llm_bytes = llm_weight_bytes(llm_config, placement)
    context = 0 if remote else min(config.llm.max_length, llm_config.max_position_embeddings)  # KV held here
    llm_device, vision_device = str(placement.llm_device), str(placement.vision_device)  # CUDA always indexed
    breakdown: dict[str, dict[str, int]] = {}

    def add(device: str, part: str, size: int) -> None:
        parts = breakdown.setdefault(device, dict.fromkeys(PARTS, 0))
        parts[part] += int(size)

    add(llm_device, "llm_weights", llm_bytes)
    add(llm_device, "qformer", bridge_bytes)
    add(llm_device, "kv_cache", kv_cache_bytes(llm_config, context * config.generation.num_beams, placement))
    add(llm_device, "activations", llm_activation_bytes(llm_config, context, placement))
    add(vision_device, "vision", vision_bytes)
    add(vision_device, "activations", vision_activations)
    add("cpu", "overhead", HOST_BASELINE_BYTES)  # place_vision converts tensor by tensor: no float32 copy of the ViT
    for device in breakdown:
        if device.startswith("cuda"):
            add(device, "overhead", CUDA_CONTEXT_BYTES)
    if any(d.startswith("cuda") for d in breakdown) and not torch.cuda.is_available():
        notes.append("estimated for a CUDA GPU (none on this machine)")
    return MemoryEstimate(placement.mode, breakdown, notes)


def llm_architecture(config: Config) -> tuple[PretrainedConfig, list[str]]:
    """The LLM's config from its folder's config.json, or the family's usual LLM when it is absent."""
    try:
        folder = resolve_weights(config.weights.llama_model, "weights.llama_model", cache_dir=config.weights.cache_dir)
    except MissingWeightsError:
        name, dims = family_spec(config.model.family).default_llm
        note = (f"LLM folder not present: assumed {name} (LLaMA, hidden {dims['hidden_size']},"
                f" {dims['num_hidden_layers']} layers, {dims['num_attention_heads']} heads"
                f" ({dims['num_key_value_heads']} key/value), intermediate {dims['intermediate_size']},"
                f" vocab {dims['vocab_size']}, {dims['max_position_embeddings']} positions)")
        if "qformer" in family_spec(config.model.family).sections and config.llm.hidden_size != dims["hidden_size"]:
            note += f", although llm.hidden_size is {config.llm.hidden_size}"
        return LlamaConfig(**dims), [note]
    return AutoConfig.from_pretrained(folder), []


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def llm_weight_bytes(llm_config: PretrainedConfig, placement: Placement) -> int:
    """Bytes of the LLM's weights as loaded for ``placement`` (quantised per transformers' rules)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llm_config, dtype=placement.llm_dtype)
    if placement.llm_quantization is None:
        return tensor_bytes(model)
    from .llm import quantization_config

    bnb_config = quantization_config(placement)
    model = quantize_meta_model(model, bnb_config)
    return quantized_bytes(model, placement.llm_dtype, bnb_config)


def quantize_meta_model(model: nn.Module, bnb_config: BitsAndBytesConfig) -> nn.Module:
    """Replace Linear layers by bitsandbytes layers exactly as ``from_pretrained`` would (on meta)."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config)
    skip = quantizer.get_modules_to_not_convert(model, bnb_config.llm_int8_skip_modules,
                                                getattr(model, "_keep_in_fp32_modules", None))
    return replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_config)


def quantized_bytes(model: nn.Module, dtype: torch.dtype, bnb_config: BitsAndBytesConfig) -> int:
    """Bytes of a meta model after bitsandbytes replacement: quantised weights as stored, the rest in ``dtype``."""
    import bitsandbytes as bnb

    element = dtype.itemsize
    total, quantized = 0, set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            total += module.weight.numel() + module.out_features * 4  # int8 + float32 row scales (SCB)
        elif isinstance(module, bnb.nn.Linear4bit):
            total += _nf4_bytes(module.weight.numel(), bnb_config.bnb_4bit_use_double_quant)
        else:
            continue
        quantized.add(id(module.weight))
    # from_pretrained gives every other parameter the LLM dtype; buffers keep their own (rotary inv_freq: float32).
    params = {id(p): p for p in model.parameters() if id(p) not in quantized}
    total += sum(p.numel() for p in params.values()) * element
    buffers = {id(b): b for b in model.buffers()}
    return total + sum(b.numel() * b.element_size() for b in buffers.values())


def _nf4_bytes(numel: int, double_quant: bool) -> int:
    blocks = -(-numel // NF4_BLOCKSIZE)
    packed = -(-numel // 2)
    if double_quant:  # absmax as one byte per block, plus a float32 absmax and offset per 256 blocks
        return packed + blocks + (-(-blocks // DOUBLE_QUANT_BLOCKSIZE)) * 4 + 4 + 16 * 4 + 256 * 4
    return packed + blocks * 4 + 16 * 4  # float32 absmax per block + the 16-value NF4 code book


def kv_cache_bytes(llm_config: PretrainedConfig, tokens: int, placement: Placement) -> int:
    """Keys and values of every layer for ``tokens`` positions, in the LLM compute dtype."""
    heads = llm_config.num_attention_heads
    kv_heads = getattr(llm_config, "num_key_value_heads", None) or heads
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // heads
    element = placement.llm_dtype.itemsize
    return 2 * llm_config.num_hidden_layers * kv_heads * head_dim * tokens * element


def llm_activation_bytes(llm_config: PretrainedConfig, tokens: int, placement: Placement) -> int:
    """Largest transient of a prefill over ``tokens`` positions (SDPA attention; see the module docstring)."""
    element = placement.llm_dtype.itemsize
    hidden, inter = llm_config.hidden_size, llm_config.intermediate_size
    logits = llm_config.vocab_size * 4  # the chat engine keeps the last position's logits only
    layer = tokens * (3 * inter + 5 * hidden) * element  # gate, up, their product; q, k, v, attention out, normed
    if placement.llm_quantization == "8bit":
        layer += tokens * max(inter, hidden) * (4 + 1)  # int32 accumulator + int8 copy of the input
    return max(logits, layer) + tokens * hidden * element  # plus the residual stream


def vision_activation_bytes(config: Config, placement: Placement) -> int:
    """One image through one ViT block: tokens x (qkv + MLP hidden) and the attention scores."""
    vision = config.vision
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    element = 2 if placement.vision_device.type == "cuda" and placement.vision_half_weights else 4
    mlp_hidden = int(vision.embed_dim * vision.mlp_ratio)
    per_block = tokens * (4 * vision.embed_dim + 2 * mlp_hidden) * element
    scores = vision.num_heads * tokens * tokens * 4
    return per_block + scores + tokens * vision.embed_dim * 4 * 2  # plus the float32 output and ln_vision


def format_breakdown(result: MemoryEstimate) -> list[str]:
    """Lines for a terminal: per device the total and each non-zero part."""
    lines = []
    for device, parts in result.breakdown.items():
        shown = ", ".join(f"{part} {format_bytes(size)}" for part, size in parts.items() if size)
        lines.append(f"{device}: {format_bytes(result.peak[device])} ({shown})")
    return lines


def format_bytes(size: int) -> str:
    """GiB with two decimals, or MiB below 0.1 GiB."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 / 10 else f"{size / MiB:.1f} MiB"


# --- does it fit (``xraygpt check``) -----------------------------------------------------------
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


@dataclass
class MemoryFit:
    """An estimate against this machine: each device's size, whether the peak fits, and the other
    runtime modes whose estimate would (mode -> peak per device, largest first: most precision)."""

    capacity: dict[str, int]
    fits: bool
    alternatives: dict[str, dict[str, int]] = field(default_factory=dict)


def device_capacity(device: str) -> int | None:
    """Bytes of memory of ``device`` on this machine (RAM for "cpu", a container's limit if lower), or None."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory if torch.cuda.is_available() \
            else None
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None
    limits = [physical]
    for path in CGROUP_LIMITS:
        with contextlib.suppress(OSError, ValueError):  # absent, or "max" (no limit)
            limits.append(int(Path(path).read_text().strip()))
    return min(limits)


def memory_fit(config: Config, peak: dict[str, int], capacity: dict[str, int] | None = None) -> MemoryFit:
    """Whether ``peak`` (the config's estimate here) fits each device, and if not, which modes would.

    ``capacity``: bytes per device; by default this machine's (``device_capacity``). A device of
    unknown size counts as fitting.
    """
    size_of = capacity.get if capacity is not None else device_capacity

    def fits(result: dict[str, int]) -> bool:
        return all(size_of(device) is None or size <= size_of(device) for device, size in result.items())

    sizes = {device: size_of(device) for device in peak if size_of(device) is not None}
    if fits(peak):
        return MemoryFit(sizes, True)
    current, others = plan_placement(config.runtime, config.vision).mode, {}
    for mode in RUNTIME_MODES:
        if mode in ("auto", current):
            continue
        trial = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, mode=mode))
        try:
            result = estimate(trial).peak
        except XrayGPTError:  # a mode this machine cannot run (fp16 without CUDA)
            continue
        if fits(result):
            others[mode] = result
    return MemoryFit(sizes, False, dict(sorted(others.items(), key=lambda item: -sum(item[1].values()))))


# --- training (``xraygpt check --train``) ------------------------------------------------------
TRAIN_MODES = {"projection fp16": "fp16", "LoRA fp16": "fp16", "QLoRA 4-bit": "4bit"}  # name -> LLM runtime mode
TRAIN_PARTS = ("vision", "qformer", "llm_weights", "trainable", "activations", "overhead")
PROMPT_TOKENS = 40  # BOS + '###Patient: <Img>' + '</Img> <instruction> ###Doctor: ' for XrayGPT's longest lines
LORA_SHAPES = {  # target module -> (in, out) as multiples of (hidden, intermediate); k/v use the kv width
    "q_proj": ("h", "h"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("h", "h"),
    "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h"),
}


@dataclass(frozen=True)
class TrainImageSide:
    """A family's image side in one training step: frozen vision, the trained bridge, its size and tokens."""

    vision_bytes: int
    bridge_bytes: int  # the bridge (Q-Former/projector) as it trains: float32
    trainable: int  # trainable parameters on the image side
    tokens: int  # LLM input tokens per image
    activation_bytes: int  # one image's vision activations


@dataclass(frozen=True)
class TrainShape:
    """What sizes one training step: rows per step, target tokens per row, LoRA rank and targets."""

    batch_size: int = 1
    max_txt_len: int = 160
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    train_qformer: bool = False


def estimate_training(config: Config, mode: str, shape: TrainShape) -> MemoryEstimate:
    """Peak GPU memory of one training step in ``mode`` (a key of ``TRAIN_MODES``), from meta-device sizes.

    Counted: the frozen ViT (fp16 as XrayGPT) and the float32 bridge; the LLM's weights (fp16 or NF4); for
    trainable parameters their gradients and AdamW's two moments (plus float32 LoRA weights); activations kept
    for the backward pass through every LLM layer (gradients reach ``llama_proj`` through the frozen LLM), or only
    each layer's input with gradient checkpointing (the LoRA modes), plus the logits and their loss; the CUDA
    context. An estimate: allocator fragmentation and kernel workspaces move the real peak.
    """
    placement = plan_placement(RuntimeConfig(mode=TRAIN_MODES[mode], device="cuda:0"), config.vision,
                               cuda_available=True)
    llm_config, notes = llm_architecture(config)
    image = family_spec(config.model.family).load("train_memory")(config, placement, llm_config, shape, notes)
    lora = lora_parameters(llm_config, shape) if mode != "projection fp16" else 0
    tokens = shape.batch_size * (PROMPT_TOKENS + image.tokens + shape.max_txt_len)
    parts = dict.fromkeys(TRAIN_PARTS, 0)
    parts["vision"] = image.vision_bytes
    parts["qformer"] = image.bridge_bytes
    parts["llm_weights"] = llm_weight_bytes(llm_config, placement)
    parts["trainable"] = image.trainable * 12 + lora * 16  # grad + 2 Adam moments (LoRA: + its float32 weight)
    parts["activations"] = (training_activation_bytes(llm_config, tokens, checkpointing=lora > 0)
                            + shape.batch_size * image.activation_bytes)
    parts["overhead"] = CUDA_CONTEXT_BYTES
    if not torch.cuda.is_available():
        notes.append("estimated for a CUDA GPU (none on this machine)")
    return MemoryEstimate(mode, {"cuda:0": {k: int(v) for k, v in parts.items()}}, notes)


def lora_parameters(llm_config: PretrainedConfig, shape: TrainShape) -> int:
    """LoRA A and B matrices: rank x (in + out) per target module per layer."""
    heads = llm_config.num_attention_heads
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // heads
    kv = (getattr(llm_config, "num_key_value_heads", None) or heads) * head_dim
    width = {"h": llm_config.hidden_size, "i": llm_config.intermediate_size, "kv": kv}
    per_layer = sum(width[LORA_SHAPES[t][0]] + width[LORA_SHAPES[t][1]] for t in shape.lora_targets if t in LORA_SHAPES)
    return shape.lora_rank * per_layer * llm_config.num_hidden_layers


def training_activation_bytes(llm_config: PretrainedConfig, tokens: int, checkpointing: bool) -> int:
    """What the backward pass keeps, in float16: per layer and token the inputs of its matmuls, norms and
    attention (about 8 x hidden + 4 x intermediate values), or with checkpointing only the layer input
    (one layer recomputed at a time); plus fp16 logits, their float32 copy for the loss and its gradient."""
    hidden, inter, layers = llm_config.hidden_size, llm_config.intermediate_size, llm_config.num_hidden_layers
    full_layer = tokens * (8 * hidden + 4 * inter) * 2
    kept = tokens * hidden * 2 * layers + full_layer if checkpointing else full_layer * layers
    return kept + tokens * llm_config.vocab_size * (2 + 4 + 4)

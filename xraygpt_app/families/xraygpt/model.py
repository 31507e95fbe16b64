"""Compose vision -> Q-Former -> LLM embeddings from the four native weight sources."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from transformers import PreTrainedTokenizerBase

from ...checkpoints import CheckpointKeyError, load_exact, read_state_dict
from ...config import Config
from ...llm import (
    apply_lora_adapter,
    check_llm_config,
    check_vocabulary,
    embed_ids,
    load_backend_llm,
    load_tokenizer,
    make_decoder,
    stop_token_sequences,
    undecodable_ids,
)
from ...placement import Placement, plan_placement
from ...weights import resolve_weights
from .. import PromptSegments
from ..registry import FAMILIES
from .checkpoints import remap_blip2, remap_eva_vit, remap_xraygpt
from .conversation import SEPARATOR, Turn, clean_answer, display_answer, render_prompt, split_on_image
from .qformer import VisionLanguageBridge, cast_bridge
from .vision import VisionTower, build_preprocess, place_vision, preprocess

log = logging.getLogger(__name__)


@dataclass
class ImageEncoding:
    """One image, encoded once: the LLM input embeddings plus the intermediates for checks."""

    llm_embeds: torch.Tensor  # (1, num_query_tokens, llm_hidden) on the LLM device, LLM dtype
    pixel_values: torch.Tensor
    vit_after_ln_vision: torch.Tensor
    qformer_last_hidden_state: torch.Tensor
    llama_proj_output: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class WeightPaths:
    ckpt: Path
    llama_model: Path
    eva_vit_g: Path
    blip2_qformer: Path


def resolve_model_weights(config: Config, download: bool = False) -> WeightPaths:
    """Find every file the model needs, or raise one MissingWeightsError per file."""
    w = config.weights
    return WeightPaths(**{name: resolve_weights(getattr(w, name), f"weights.{name}", download=download,
                                                cache_dir=w.cache_dir)
                          for name in FAMILIES["xraygpt"].weights})


def build_parts(config: Config) -> tuple[VisionTower, VisionLanguageBridge]:
    """The vision tower and bridge with random weights (use the meta device to size them)."""
    vision = VisionTower(config.vision)
    bridge = VisionLanguageBridge(config.qformer, config.vision.embed_dim, config.llm.hidden_size)
    return vision, bridge


def load_vision_and_bridge(config: Config, paths: WeightPaths) -> tuple[VisionTower, VisionLanguageBridge, dict]:
    """Load EVA, then BLIP-2, then XrayGPT's checkpoint on top (the reference's order)."""
    with torch.device("meta"):
        vision, bridge = build_parts(config)
    blip2 = remap_blip2(read_state_dict(paths.blip2_qformer, container_key="model"))
    xraygpt = remap_xraygpt(read_state_dict(paths.ckpt, container_key="model"))
    eva = {**remap_eva_vit(read_state_dict(paths.eva_vit_g)), **xraygpt["vision"]}
    vision_sd = {**{f"eva.{k}": v for k, v in eva.items()},
                 **{f"ln_vision.{k}": v for k, v in {**blip2["ln_vision"], **xraygpt["ln_vision"]}.items()}}
    load_exact(vision, vision_sd, "EVA ViT + ln_vision", allowed_missing=(r"eva\.blocks\.\d+\.attn\.k_bias",))
    bridge_sd = {**{f"qformer.{k}": v for k, v in {**blip2["qformer"], **xraygpt["qformer"]}.items()},
                 **blip2["bridge"], **xraygpt["bridge"]}
    load_exact(bridge, bridge_sd, "Q-Former + query tokens + llama_proj")
    _init_zero_k_bias(vision)
    return vision, bridge, xraygpt["inv_freq"]


def _init_zero_k_bias(vision: VisionTower) -> None:
    # timm keeps EVA's zero k bias as a non-persistent buffer; after a meta-device build it
    # must be materialised (the reference's qkv bias is [q_bias, 0, v_bias]).
    for block in vision.eva.blocks:
        attn = block.attn
        if getattr(attn, "k_bias", None) is not None and attn.k_bias.is_meta:
            attn.k_bias = torch.zeros_like(attn.q_bias, device="cpu")


def check_rotary_buffers(llm: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """XrayGPT's checkpoint stores rotary inv_freq; it must equal what transformers computes.

    The saved copy was rounded to float16 in training. The reference loads it over its own, but
    transformers 4.29 had already cached cos/sin from the exact values for 2048 positions, so
    the exact values are what the reference computes with: we check, and keep ours.
    """
    ours = llm.model.rotary_emb.inv_freq.float().cpu()
    for key, value in saved.items():
        layer = int(re.search(r"layers\.(\d+)\.", key).group(1))
        if layer >= llm.config.num_hidden_layers or not torch.allclose(value.float(), ours, rtol=1e-3, atol=0):
            raise CheckpointKeyError(f"XrayGPT checkpoint: {key} does not match the LLM's rotary embedding")


class XrayGPTModel:
    """The loaded model: encode an image once, embed text, and expose the LLM (a ``families.ChatModel``)."""

    # Text the answer may still turn into; held back while streaming so no piece is ever retracted.
    pending_suffixes = (SEPARATOR, "Doctor:", "ChatDoctor", "Chat Doctor", "\ufffd")

    def __init__(self, config: Config, vision: VisionTower, bridge: VisionLanguageBridge,
                 llm: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, placement: Placement):
        self.config, self.vision, self.bridge = config, vision, bridge
        self.llm, self.tokenizer, self.placement = llm, tokenizer, placement
        self.decode = tokenizer.decode
        self.suppressed_ids = undecodable_ids(tokenizer, llm.config.vocab_size)  # never generated
        self.weight_names: dict[str, str] = {}

    @classmethod
    def load(cls, config: Config, download: bool = False) -> XrayGPTModel:
        placement = plan_placement(config.runtime, config.vision)
        paths = resolve_model_weights(config, download=download)
        started = time.perf_counter()
        check_llm_config(paths.llama_model, config.llm)  # before the projection is sized from it
        tokenizer = load_tokenizer(paths.llama_model)
        check_vocabulary(paths.llama_model, tokenizer)  # before gigabytes of weights are read
        vision, bridge, inv_freq = load_vision_and_bridge(config, paths)
        llm = load_backend_llm(config, paths.llama_model, config.llm, placement)
        if config.runtime.llm_backend == "transformers":  # a vLLM server computes its own rotary tables
            check_rotary_buffers(llm, inv_freq)
        if config.weights.lora:
            llm = apply_lora_adapter(llm, config.weights.lora, placement)
        vision = place_vision(vision, placement)
        bridge = cast_bridge(bridge, placement).to(placement.llm_device).eval().requires_grad_(False)
        log.info("model loaded in %.1f s (mode %s)", time.perf_counter() - started, placement.mode)
        model = cls(config, vision, bridge, llm, tokenizer, placement)
        model.decode = make_decoder(paths.llama_model, model.tokenizer)
        # The checkpoint with its folder: fine-tuning runs all write checkpoint_N.pth, their folders tell them apart.
        checkpoint = f"{paths.ckpt.parent.name}/{paths.ckpt.name}"
        model.weight_names = {"checkpoint": checkpoint, "LLM": paths.llama_model.name}
        if config.weights.lora:  # a fine-tuned adapter (xraygpt finetune): name it beside the checkpoint
            model.weight_names["LoRA"] = Path(config.weights.lora).name
        return model

    def describe(self) -> str:
        """The app's "model" line: the family and the weights that answer."""
        names = ", ".join(f"{part} {name}" for part, name in self.weight_names.items())
        return self.config.model.name or f"XrayGPT (EVA ViT-g, Q-Former, LLaMA){': ' + names if names else ''}"

    def input_view(self, image: Image.Image) -> tuple[Image.Image, str]:
        """The image as BLIP-2's eval transform frames it, and how (for the app's preview)."""
        size = self.config.vision.image_size
        return (image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC),
                f"resized to {size}×{size} (aspect ratio not kept)")

    def render_prompt(self, history: list[Turn], question: str) -> PromptSegments:
        """XrayGPT's template; each side of the image tokenized on its own, BOS only before it (its splicing)."""
        text = render_prompt(history, question)
        before, after = split_on_image(text)
        return PromptSegments(text, self.tokenizer(before, add_special_tokens=True)["input_ids"],
                              self.tokenizer(after, add_special_tokens=False)["input_ids"])

    def stop_sequences(self) -> list[list[int]]:
        """Every token sequence spelling the stop string (``###``); EOS ends an answer too."""
        return stop_token_sequences(self.tokenizer, self.config.generation.stop_string)

    def answer_text(self, generated: list[int]) -> str:
        """Decoded and cleaned as XrayGPT does (leading <unk>/<s> dropped; eos not shown)."""
        ids = list(generated)
        while ids and ids[0] in (0, 1):
            ids = ids[1:]
        if ids and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return clean_answer(self.decode(ids), self.config.generation.stop_string)

    def display_answer(self, stored: str) -> str:
        """What XrayGPT shows: the stored answer with its old model name replaced."""
        return display_answer(stored)

    @property
    def context_length(self) -> int:
        """Prompt plus new tokens: XrayGPT's max_length, within the LLM's positions."""
        return min(self.config.llm.max_length, self.llm.config.max_position_embeddings)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image) -> ImageEncoding:
        """Preprocess, run the ViT and Q-Former, project into the LLM's embedding space."""
        t0 = time.perf_counter()
        pixel_values = self.preprocess(image)
        t1 = time.perf_counter()
        vit, hidden, projected, t2 = self._image_side(pixel_values)
        t3 = _synchronized_time(self.placement.llm_device)
        timings = {"preprocess_s": t1 - t0, "vision_s": t2 - t1, "qformer_s": t3 - t2}
        return ImageEncoding(projected.to(self.placement.llm_dtype), pixel_values, vit, hidden, projected, timings)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """BLIP-2's eval transform: ``(1, 3, S, S)`` float32 pixels."""
        return preprocess(image, self.config.vision)

    @property
    def preprocess_transform(self) -> transforms.Compose:
        """The torchvision transform behind :meth:`preprocess` (its geometry maps heatmaps back)."""
        vision = self.config.vision
        return build_preprocess(vision)

    @property
    def patch_size(self) -> int:
        return self.config.vision.patch_size

    def image_tokens(self, pixel_values: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Pixels -> the 32 image rows of the LLM input (ViT, Q-Former, ``llama_proj``): the one step that
        chat, fine-tuning and the report maps share. Differentiable (maps take gradients to the pixels).

        ``train``: the frozen ViT runs without gradients and the bridge outside autocast, in the float32
        the trainer fits it in (XrayGPT's ``encode_img`` during training).
        """
        if train:
            with torch.no_grad():
                vit = self.vision(pixel_values.to(self.placement.vision_device))
            return self.bridge(vit.float().to(self.placement.llm_device))[1]
        return self._image_side(pixel_values)[2]

    def _image_side(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """ViT tokens, Q-Former output and projection (the fixture checks all three), and when the ViT ended."""
        vit = self.vision(pixel_values.to(self.placement.vision_device))
        vision_done = _synchronized_time(self.placement.vision_device)
        hidden, projected = self.bridge_tokens(vit)
        return vit, hidden, projected, vision_done

    def parts(self) -> dict[str, torch.nn.Module]:
        """The model's modules by name (frozen together for maps; randomised layer by layer in checks)."""
        return {"vision": self.vision, "bridge": self.bridge, "llm": self.llm}

    def cascade_layers(self) -> list[tuple[str, torch.nn.Module]]:
        """Layers from the output to the input, for the model-randomisation check of the report maps."""
        llm_layers = [(f"llm.layers.{i}", layer) for i, layer in enumerate(self.llm.model.layers)][::-1]
        vit_blocks = [(f"vit.blocks.{i}", block) for i, block in enumerate(self.vision.eva.blocks)][::-1]
        return [("llm.lm_head", self.llm.lm_head), *llm_layers, ("bridge", self.bridge), *vit_blocks,
                ("vit.patch_embed", self.vision.eva.patch_embed)]

    def bridge_tokens(self, vit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT tokens -> (Q-Former output, projection into the LLM space), under the bridge's autocast.

        Not decorated with inference_mode, so ``xraygpt_app.explain`` can differentiate through it.
        """
        with self._bridge_autocast():
            return self.bridge(vit.float().to(self.placement.llm_device))

    def _bridge_autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.placement.bridge_autocast_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        """Token ids -> (1, n, hidden) input embeddings on the LLM device."""
        return embed_ids(self.llm, ids, self.placement.llm_device)


def _synchronized_time(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

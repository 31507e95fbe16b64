"""The llava family: open_clip tower patch tokens -> LLaVA-1.5 projector -> any chat LLM.

The tower (``tower.py``) gives one block's real per-patch outputs; the projector is LLaVA-1.5's
``mlp2x_gelu`` (Linear -> GELU -> Linear) or ``linear``, sized from the tower width and the LLM's
hidden size; the LLM is any Hugging Face causal LM with a chat template. Prompts are the
tokenizer's own ``apply_chat_template`` with an ``<image>`` placeholder at the start of the first
user message (LLaVA-1.5's ``<image>\\n{question}``), replaced by the projected tokens; answers stop
on the template's end-of-turn token(s) and the model's EOS. Precision modes, LLM loading and
weights lookup are the ones XrayGPT uses (``placement``, ``llm``, ``weights``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from ...checkpoints import CheckpointKeyError, load_exact, read_state_dict
from ...config import Config
from ...errors import ConfigError
from ...llm import (
    apply_lora_adapter,
    check_vocabulary,
    embed_ids,
    load_backend_llm,
    load_tokenizer,
    stop_token_sequences,
    undecodable_ids,
)
from ...placement import Placement, plan_placement
from ...weights import resolve_weights
from .. import PromptSegments, Turn
from ..registry import FAMILIES
from .tower import PatchTokenTower, load_tower

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's DEFAULT_IMAGE_TOKEN, as text in the rendered template
PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.")  # LLaVA's mm_projector.bin, and ours
_PROBE = "XRAYGPTENDOFTURNPROBE"  # an assistant message whose rendering shows what the template puts after it


def build_projector(kind: str, tower_width: int, llm_hidden: int) -> nn.Module:
    """LLaVA-1.5's projector: ``mlp2x_gelu`` = Linear -> GELU -> Linear, or one ``linear`` layer."""
    if kind == "linear":
        return nn.Linear(tower_width, llm_hidden)
    return nn.Sequential(nn.Linear(tower_width, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))


def read_projector(path: Path) -> dict[str, torch.Tensor]:
    """A projector file (safetensors, LLaVA's ``mm_projector.bin`` or a finetune checkpoint), key prefix removed."""
    state = load_file(str(path)) if path.suffix == ".safetensors" else _read_pickled(path)
    out = {}
    for key, value in state.items():
        prefix = next((p for p in PROJECTOR_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointKeyError(f"{path}: unexpected key {key!r} (a projector file holds mm_projector.* only)")
        out[key.removeprefix(prefix)] = value
    return out


def _read_pickled(path: Path) -> dict[str, torch.Tensor]:
    """LLaVA's plain ``mm_projector.bin``, or a ``xraygpt finetune`` checkpoint (``{'model': ...}``)."""
    try:
        return read_state_dict(path)
    except CheckpointKeyError:
        return read_state_dict(path, container_key="model")


@dataclass
class LlavaImageEncoding:
    """One image, encoded once: the projected LLM input embeddings and the tower's tokens."""

    llm_embeds: torch.Tensor  # (1, image tokens, llm hidden) on the LLM device, LLM dtype
    pixel_values: torch.Tensor
    patch_tokens: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


class ChatTemplate:
    """A tokenizer's chat template as this family uses it: image message, segments, end of turn."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, folder: Path):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"the LLM in {folder} has no chat template; the llava family needs a chat model"
                              " (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0)")
        self.tokenizer = tokenizer
        self.end_of_turn = self._end_of_turn()

    def _end_of_turn(self) -> str:
        """What the template writes after an assistant message (e.g. ``</s>``, ``<|im_end|>``, ``<|eot_id|>``)."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], tokenize=False)
        return text.partition(_PROBE)[2].strip()

    def render(self, history: list[Turn], question: str) -> PromptSegments:
        """The conversation through ``apply_chat_template``, split at the image into token segments.

        The image rides on the first message, LLaVA-1.5's ``<image>\\n{question}``. Each side of the
        image is tokenized on its own (LLaVA's ``tokenizer_image_token``); BOS once, unless the
        template already writes it.
        """
        messages = []
        for i, turn in enumerate([*history, Turn(question, "")]):
            messages.append({"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{turn.question}" if i == 0
                             else turn.question})
            if i < len(history):
                messages.append({"role": "assistant", "content": turn.answer})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, _, after = text.partition(IMAGE_PLACEHOLDER)  # the first one: the user may type "<image>" too
        bos = self.tokenizer.bos_token
        add_bos = not (bos and before.startswith(bos))
        return PromptSegments(text, self.tokenizer(before, add_special_tokens=add_bos)["input_ids"],
                              self.tokenizer(after, add_special_tokens=False)["input_ids"])

    def stop_sequences(self, eos_ids: list[int]) -> list[list[int]]:
        """The end-of-turn marker as one special token, or every token sequence spelling it; plus EOS."""
        stops = [[i] for i in eos_ids]
        marker = self.end_of_turn
        if marker:
            token_id = self.tokenizer.convert_tokens_to_ids(marker)
            if marker in self.tokenizer.get_vocab() and token_id != self.tokenizer.unk_token_id:
                stops.append([token_id])
            else:
                stops += stop_token_sequences(self.tokenizer, marker)
        return sorted({tuple(s): s for s in stops}.values(), key=lambda s: (len(s), s))


class LlavaModel:
    """The loaded llava-family model (a ``families.ChatModel``)."""

    def __init__(self, config: Config, tower: PatchTokenTower, projector: nn.Module, llm: nn.Module,
                 tokenizer: PreTrainedTokenizerBase, placement: Placement, template: ChatTemplate,
                 weight_names: dict[str, str] | None = None):
        self.config, self.tower, self.projector = config, tower, projector
        self.llm, self.tokenizer, self.placement, self.template = llm, tokenizer, placement, template
        self.weight_names = weight_names or {}
        self.suppressed_ids = undecodable_ids(tokenizer, llm.config.vocab_size)  # never generated
        self.pending_suffixes = tuple(s for s in (template.end_of_turn, "\ufffd") if s)

    @classmethod
    def load(cls, config: Config, download: bool = False, new_projector: bool = False) -> LlavaModel:
        """Load tower, LLM (and adapter) and projector. ``new_projector``: when ``weights.projector`` names no
        source, start from a freshly initialised one (stage 1 of fine-tuning) instead of failing."""
        placement = plan_placement(config.runtime, config.vision)
        fresh = new_projector and not config.weights.projector.sources
        paths = {name: resolve_weights(getattr(config.weights, name), f"weights.{name}", download=download,
                                       cache_dir=config.weights.cache_dir)
                 for name in FAMILIES["llava"].weights if not (fresh and name == "projector")}
        started = time.perf_counter()
        tokenizer = load_tokenizer(paths["llama_model"])
        template = ChatTemplate(tokenizer, paths["llama_model"])
        check_vocabulary(paths["llama_model"], tokenizer)  # before gigabytes of weights are read
        tower = load_tower(paths["vision_tower"], config.tower, placement.vision_device, placement.vision_dtype)
        hidden = AutoConfig.from_pretrained(paths["llama_model"]).hidden_size  # the projector is sized from it
        llm = load_backend_llm(config, paths["llama_model"], dataclasses.replace(config.llm, hidden_size=hidden),
                               placement)
        if config.weights.lora:  # stage 2 of `xraygpt finetune`
            llm = apply_lora_adapter(llm, config.weights.lora, placement)
        projector = (build_projector(config.projector.type, tower.width, hidden) if fresh else
                     load_projector(paths["projector"], config.projector.type, tower.width, hidden))
        projector = projector.to(placement.llm_device, placement.llm_dtype).eval().requires_grad_(False)
        log.info("llava model loaded in %.1f s (mode %s)", time.perf_counter() - started, placement.mode)
        # The projector with its folder: fine-tuning runs all write checkpoint_N.pth, their folders tell them apart.
        projector_name = "new" if fresh else f"{paths['projector'].parent.name}/{paths['projector'].name}"
        names = {"tower": _name(paths["vision_tower"]), "projector": projector_name,
                 "LLM": _name(paths["llama_model"])}
        if config.weights.lora:
            names["LoRA"] = Path(config.weights.lora).name
        return cls(config, tower, projector, llm, tokenizer, placement, template, names)

    def describe(self) -> str:
        """The app's "model" line: the family and the weights that answer."""
        parts = ", ".join(f"{part} {name}" for part, name in self.weight_names.items())
        return self.config.model.name or f"LLaVA-style ({self.config.projector.type} projector): {parts}"

    @torch.inference_mode()
    def encode_image(self, image: Image.Image) -> LlavaImageEncoding:
        """open_clip preprocessing, the tower's patch tokens, the projector into the LLM's space."""
        t0 = time.perf_counter()
        pixel_values = self.preprocess(image)
        t1 = time.perf_counter()
        tokens = self._patch_tokens(pixel_values)
        t2 = time.perf_counter()
        projected = self._project(tokens).to(self.placement.llm_dtype)
        timings = {"preprocess_s": t1 - t0, "vision_s": t2 - t1, "projector_s": time.perf_counter() - t2}
        return LlavaImageEncoding(projected, pixel_values, tokens, timings)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The tower's open_clip eval transform: ``(1, 3, S, S)`` float32 pixels."""
        return self.tower.preprocess(image)

    @property
    def preprocess_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The torchvision transform behind :meth:`preprocess` (its geometry maps heatmaps back)."""
        return self.tower.preprocess_fn

    @property
    def patch_size(self) -> int:
        trunk = getattr(self.tower.visual, "trunk", None)  # a timm trunk (BiomedCLIP) or open_clip's own ViT
        return (trunk.patch_embed.patch_size if trunk is not None else self.tower.visual.patch_size)[0]

    def image_tokens(self, pixel_values: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Pixels -> the image rows of the LLM input (tower patch tokens through the projector): the one step
        that chat, fine-tuning and the report maps share. Differentiable (maps take gradients to the pixels).

        ``train``: the frozen tower runs without gradients and outside autocast; the projector in its float32.
        """
        if train:
            with torch.no_grad():
                tokens = self.tower(pixel_values.to(self.placement.vision_device))
            return self.projector(tokens.float().to(self.placement.llm_device))
        return self._project(self._patch_tokens(pixel_values))

    def _patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with self._tower_autocast():
            return self.tower(pixel_values.to(self.placement.vision_device))

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = next(self.projector.parameters())  # float32 while it trains, else the LLM dtype
        return self.projector(tokens.to(weight.device, weight.dtype))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def parts(self) -> dict[str, nn.Module]:
        """The model's modules by name (frozen together for maps)."""
        return {"tower": self.tower, "projector": self.projector, "llm": self.llm}

    def cascade_layers(self) -> list[tuple[str, nn.Module]]:
        """Layers from the output to the input, for the model-randomisation check of the report maps."""
        llm_layers = [(f"llm.layers.{i}", layer) for i, layer in enumerate(self.llm.model.layers)][::-1]
        trunk = self.tower.visual.trunk
        blocks = [(f"tower.blocks.{i}", block) for i, block in enumerate(trunk.blocks)][::-1]
        return [("llm.lm_head", self.llm.lm_head), *llm_layers, ("projector", self.projector), *blocks,
                ("tower.patch_embed", trunk.patch_embed)]

    def _tower_autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.placement.vision_autocast_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        """Token ids -> (1, n, hidden) input embeddings on the LLM device."""
        return embed_ids(self.llm, ids, self.placement.llm_device)

    def input_view(self, image: Image.Image) -> tuple[Image.Image, str]:
        """The image as the tower's open_clip transform frames it (its steps before ``ToTensor``), and how."""
        return self.tower.input_view(image)

    def render_prompt(self, history: list[Turn], question: str) -> PromptSegments:
        """The tokenizer's chat template around the image (see :class:`ChatTemplate`)."""
        return self.template.render(history, question)

    def stop_sequences(self) -> list[list[int]]:
        """The template's end of turn and every EOS id of the model's generation config."""
        eos = self.llm.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        return self.template.stop_sequences([i for i in {*eos_ids, self.tokenizer.eos_token_id} if i is not None])

    def answer_text(self, generated: list[int]) -> str:
        """The answer without its end-of-turn marker, special tokens or surrounding space."""
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        marker = self.template.end_of_turn
        return (text.split(marker)[0] if marker else text).strip()

    def display_answer(self, stored: str) -> str:
        return stored

    @property
    def context_length(self) -> int:
        """Prompt plus new tokens: ``llm.max_length`` within the LLM's positions."""
        return min(self.config.llm.max_length, self.llm.config.max_position_embeddings)


def load_projector(path: Path, kind: str, tower_width: int, llm_hidden: int) -> nn.Module:
    """Build the projector for these widths and load its file strictly (a shape mismatch names both)."""
    projector = build_projector(kind, tower_width, llm_hidden)
    state = read_projector(path)
    try:
        load_exact(projector, state, f"projector {path.name} ({kind}, {tower_width} -> {llm_hidden})")
    except CheckpointKeyError as exc:
        raise CheckpointKeyError(f"{exc}. Was it trained for this tower, LLM and projector.type?") from None
    return projector


def _name(path: Path) -> str:
    """A readable name for a resolved weights folder (a Hub snapshot's repo, else the folder name)."""
    parts = path.parts
    if "snapshots" in parts:  # .../models--org--name/snapshots/<commit>
        return parts[parts.index("snapshots") - 1].removeprefix("models--").replace("--", "/")
    return path.name

"""MedCLIP (Wang et al., EMNLP 2022) rebuilt from library classes, loading its released ``pytorch_model.bin``.

Towers: transformers ``SwinModel`` (ViT variant) or torchvision ``resnet50`` (ResNet variant) for images,
transformers ``BertModel`` (Bio_ClinicalBERT) for text, each with MedCLIP's bias-free projection head.
Module names mirror MedCLIP's (``vision_model.model``, ``text_model.projection_head``...), so the only
remap needed is transformers 4.24 -> 5.x Swin naming.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BertModel, SwinModel

from ..checkpoints import CheckpointKeyError, load_exact
from ..errors import BadInputError, MissingWeightsError
from ..weights import HUB_PREFIX
from .prompts import DEFAULT_TEMPLATE

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
IMAGE_MEAN = 0.5862785803043838  # MedCLIP constants.IMG_MEAN (one grey channel)
IMAGE_STD = 0.27950088968644304
MAX_TEXT_LENGTH = 77
LOGIT_SCALE_MAX = 4.6052  # MedCLIP clamps log(scale) to [0, 4.6052] before exp(): scale <= 100
WEIGHTS_NAME = "pytorch_model.bin"

# transformers 4.24 SwinModel block names -> 5.x names (suffix after "...blocks.{i}.").
# None drops the key on purpose: relative_position_index is a non-persistent buffer in 5.x.
SWIN_BLOCK_RENAMES: dict[str, str | None] = {
    "attention.self.query.": "attention.q_proj.",
    "attention.self.key.": "attention.k_proj.",
    "attention.self.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
    "attention.self.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
    "attention.self.relative_position_index": None,
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
}
# Buffers the released file stores but today's modules recompute.
DROPPED_KEYS = re.compile(r"^text_model\.model\.embeddings\.position_ids$")
KNOWN_PREFIXES = ("logit_scale", "vision_model.model.", "vision_model.projection_head.",
                  "text_model.model.", "text_model.projection_head.")
_BLOCK = re.compile(r"^(vision_model\.model\.encoder\.layers\.\d+\.blocks\.\d+\.)(.*)$")


def remap_medclip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a released MedCLIP state dict to this module's names (pure; the input is not changed).

    Accepts both the transformers-4.24 Swin names of the released files and 5.x names. Raises
    BadInputError naming any key that is not part of MedCLIP's layout.
    """
    unknown = sorted(k for k in state_dict if not k.startswith(KNOWN_PREFIXES))
    if unknown:
        raise CheckpointKeyError(f"not a MedCLIP checkpoint: unexpected keys {unknown[:5]}"
                            f"{' ...' if len(unknown) > 5 else ''}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = _rename_key(key)
        if new_key is not None:
            out[new_key] = value
    return out


def _rename_key(key: str) -> str | None:
    if DROPPED_KEYS.match(key):
        return None
    match = _BLOCK.match(key)
    if not match:
        return key
    prefix, rest = match.groups()
    for old, new in SWIN_BLOCK_RENAMES.items():
        if rest.startswith(old):
            return None if new is None else prefix + new + rest[len(old):]
    return key


# The way back (5.x -> 4.24 names), for saving in the released layout; the position index is a buffer again.
RELEASED_BLOCK_NAMES: dict[str, str] = {
    **{new: old for old, new in SWIN_BLOCK_RENAMES.items() if new is not None},
    "attention.relative_position_bias.relative_position_index": "attention.self.relative_position_index",
}
# Buffers the released file holds that today's modules keep out of their state dict (non-persistent).
RELEASED_BUFFERS = re.compile(r"(relative_position_index|^text_model\.model\.embeddings\.position_ids)$")


def released_key(key: str) -> str:
    """The released file's (transformers 4.24) name of one of this module's parameter or buffer names."""
    match = _BLOCK.match(key)
    if not match:
        return key
    prefix, rest = match.groups()
    for new, old in RELEASED_BLOCK_NAMES.items():
        if rest.startswith(new):
            return prefix + old + rest[len(new):]
    return key


def export_medclip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as MedCLIP's ``pytorch_model.bin`` holds them (its names, its buffers), on the CPU.

    The inverse of :func:`remap_medclip_state_dict`: what it returns loads into MedCLIP's own
    ``MedCLIPModel`` (transformers 4.24) and back through :func:`build_medclip`.
    """
    tensors = dict(model.state_dict())
    tensors.update({name: buffer for name, buffer in model.named_buffers() if RELEASED_BUFFERS.search(name)})
    out = {released_key(name): value.detach().cpu().clone() for name, value in tensors.items()}
    for key, value in out.items():
        if key.endswith("relative_position_index") and value.ndim == 1:  # 4.24 kept it (window², window²)
            side = int(round(value.numel() ** 0.5))
            out[key] = value.reshape(side, side)
    return out


def detect_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``vit`` or ``resnet`` from sentinel keys of the released file."""
    if "vision_model.projection_head.weight" in state_dict:
        return "vit"
    if "vision_model.model.fc.weight" in state_dict:
        return "resnet"
    raise BadInputError("not a MedCLIP checkpoint: no vision projection (projection_head or fc) found")


class MedCLIPVision(nn.Module):
    """Image tower: Swin pooled output -> projection, or resnet50 whose ``fc`` is the projection."""

    def __init__(self, variant: str, projection_dim: int, swin_config=None) -> None:
        super().__init__()
        self.variant = variant
        if variant == "vit":
            self.model = SwinModel(swin_config)
            self.projection_head = nn.Linear(swin_config.hidden_size, projection_dim, bias=False)
        elif variant == "resnet":
            self.model = torchvision.models.resnet50(weights=None)
            self.model.fc = nn.Linear(self.model.fc.in_features, projection_dim, bias=False)
        else:
            raise BadInputError(f"unknown MedCLIP variant {variant!r} (vit or resnet)")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] == 1:  # MedCLIP feeds one grey channel, repeated for the RGB stem
            pixel_values = pixel_values.repeat(1, 3, 1, 1)
        if self.variant == "resnet":
            return self.model(pixel_values)
        return self.projection_head(self.model(pixel_values).pooler_output)


class MedCLIPText(nn.Module):
    """BERT -> mean over positions (padding included) of hidden states 1, 2 and last -> projection."""

    def __init__(self, bert_config, projection_dim: int) -> None:
        super().__init__()
        self.model = BertModel(bert_config)
        self.projection_head = nn.Linear(bert_config.hidden_size, projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = torch.stack([out.hidden_states[1], out.hidden_states[2], out.hidden_states[-1]], dim=1)
        # MedCLIP averages over every position, padding too: embeddings depend on the batch's longest prompt.
        return self.projection_head(hidden.mean(dim=2).mean(dim=1))


class MedCLIP(nn.Module):
    """The dual encoder with MedCLIP's state-dict layout and its clamped logit scale."""

    def __init__(self, variant: str, bert_config, projection_dim: int, swin_config=None) -> None:
        super().__init__()
        self.vision_model = MedCLIPVision(variant, projection_dim, swin_config)
        self.text_model = MedCLIPText(bert_config, projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings."""
        return nn.functional.normalize(self.vision_model(pixel_values), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings."""
        return nn.functional.normalize(self.text_model(input_ids, attention_mask), dim=-1)

    def scale(self) -> float:
        """exp of the logit scale clamped to [0, 4.6052], as MedCLIP applies it."""
        return float(self.logit_scale.detach().clamp(0, LOGIT_SCALE_MAX).exp())


def medclip_preprocess(image: Image.Image) -> torch.Tensor:
    """MedCLIPFeatureExtractor: grey square pad (black, centred, side >= 224) -> 224 bicubic -> normalise.

    Pasting onto a mode-L canvas converts RGB to grey with PIL's luma weights, as MedCLIP does.
    Returns a (1, 224, 224) float tensor.
    """
    width, height = image.size
    side = max(IMAGE_SIZE, width, height)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    resized = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)  # already square: the centre crop is a no-op
    array = np.asarray(resized, dtype=np.float32) / 255.0
    array = (array - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return torch.from_numpy(array).unsqueeze(0)


def read_medclip_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict from ``pytorch_model.bin``, a folder holding it, or the released zip."""
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():  # else the tower-config message below would be misleading
            raise MissingWeightsError(f"the MedCLIP weights folder {path} holds no {WEIGHTS_NAME}")
        path = path / WEIGHTS_NAME
    if path.suffix == ".zip":  # the released archive (torch's own format is a zip too: go by the suffix)
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith(WEIGHTS_NAME)]
                if not names:
                    raise BadInputError(f"{path.name}: the zip holds no {WEIGHTS_NAME}")
                data = io.BytesIO(archive.read(names[0]))
        except (zipfile.BadZipFile, EOFError) as exc:  # a truncated or partial download
            raise BadInputError(f"cannot read MedCLIP weights {path.name}: {exc}") from None
        return _torch_load(data, path)
    return _torch_load(path, path)


def _torch_load(source, path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise BadInputError(f"cannot read MedCLIP weights {path.name}: {str(exc).splitlines()[0][:200]}") from None


def _pretrained(source: str) -> tuple[str, dict]:
    """``from_pretrained`` arguments: a local folder, or an ``hf-hub:`` id read from the cache only.

    Like weights, tower configs are never downloaded at load time (no network retries on offline machines).
    """
    if source.startswith(HUB_PREFIX):
        return source.removeprefix(HUB_PREFIX), {"local_files_only": True}
    return source, {}


def _tower_config(source: str, model_type: str, field: str):
    """The transformers config of one tower, checked to be of the architecture MedCLIP builds."""
    name, kwargs = _pretrained(source)
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except ValueError as exc:  # a folder whose config.json is absent or names no known model_type
        raise BadInputError(f"{field} {source} is not a transformers {model_type} config:"
                            f" {str(exc).splitlines()[0]}") from None
    if config.model_type != model_type:
        raise BadInputError(f"{field} {source} is a {config.model_type} config; MedCLIP needs a {model_type} one")
    return config


def build_medclip(weights_path: str | Path, text_config: str, vision_config: str | None = None,
                  variant: str | None = None) -> MedCLIP:
    """Build MedCLIP from a released weights file and the Swin/BERT config folders (or ``hf-hub:`` ids)."""
    released = read_medclip_file(weights_path)
    found = detect_variant(released)
    if variant is not None and variant != found:
        raise BadInputError(f"the weights file is a MedCLIP-{found} checkpoint, but medclip-{variant} was asked for")
    state_dict = remap_medclip_state_dict(released)
    projection_dim = state_dict["text_model.projection_head.weight"].shape[0]
    bert_config = _tower_config(text_config, "bert", "text_config")
    swin_config = None
    if found == "vit":
        if not vision_config:
            raise BadInputError("medclip-vit needs vision_config (the Swin config folder or hf-hub id)")
        swin_config = _tower_config(vision_config, "swin", "vision_config")
    model = MedCLIP(found, bert_config, projection_dim, swin_config)
    # Strict: a missing/unexpected key or a shape mismatch (towers vs weights) raises CheckpointKeyError.
    load_exact(model, state_dict, f"MedCLIP-{found} checkpoint")
    log.info("MedCLIP-%s loaded: %d tensors, projection %d", found, len(state_dict), projection_dim)
    return model.eval()


class MedCLIPTokenizer:
    """Bio_ClinicalBERT tokenizer used as MedCLIP does: one batch, padding to its longest, max 77."""

    def __init__(self, text_config: str) -> None:
        name, kwargs = _pretrained(text_config)
        self.tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=MAX_TEXT_LENGTH,
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class MedCLIPEncoder:
    """Adapter with the zero-shot encoder interface: normalised image/text embeddings and a logit scale."""

    default_template = DEFAULT_TEMPLATE

    def __init__(self, model: MedCLIP, tokenizer: MedCLIPTokenizer, device: str = "cpu") -> None:
        self.model, self.tokenizer, self.device = model.to(device), tokenizer, device

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 1, 224, 224) model input after MedCLIP's preprocessing (on the CPU)."""
        return torch.stack([medclip_preprocess(image) for image in images])

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised embeddings of preprocessed pixels, on the model's device (differentiable)."""
        return self.model.encode_image(pixels.to(self.device))

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised embeddings after MedCLIP's preprocessing."""
        return self.embed_pixels(self.pixel_values(images)).cpu()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P, D) L2-normalised embeddings; the prompts are one tokenizer batch, as MedCLIP does per class."""
        batch = {k: v.to(self.device) for k, v in self.tokenizer(prompts).items()}
        return self.model.encode_text(**batch).cpu()

    def logit_scale(self) -> float:
        """MedCLIP's clamped, exponentiated logit scale."""
        return self.model.scale()


def load_encoder(weights_path: str | Path, text_config: str, vision_config: str | None = None,
                 variant: str | None = None, device: str = "cpu") -> MedCLIPEncoder:
    """A ready MedCLIPEncoder from the released weights and the tower configs."""
    try:
        model = build_medclip(weights_path, text_config, vision_config, variant)
        tokenizer = MedCLIPTokenizer(text_config)
    except OSError as exc:  # transformers: a config/tokenizer folder or Hub id that is not available offline
        raise MissingWeightsError(
            f"MedCLIP's tower config or tokenizer is not available ({str(exc).splitlines()[0]}). Looked for "
            f"text_config={text_config} and vision_config={vision_config}. Point them at local folders, or download "
            f"the Hub repos once (e.g. `hf download emilyalsentzer/Bio_ClinicalBERT` and "
            f"`hf download microsoft/swin-tiny-patch4-window7-224`) so they are in the huggingface_hub cache."
        ) from None
    return MedCLIPEncoder(model, tokenizer, device)

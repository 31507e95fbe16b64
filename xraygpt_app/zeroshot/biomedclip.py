"""BiomedCLIP (Zhang et al. 2023) through open_clip's own loaders: no re-implementation.

The weights spec resolves (``weights.resolve_weights``) to a local folder holding
``open_clip_config.json`` and ``open_clip_pytorch_model.bin`` -- a copy of the Hub repo
``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` or its huggingface_hub snapshot --
which open_clip loads as ``local-dir:`` (strict load, its tokenizer, context length 256 and
preprocessing as released).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..errors import BadInputError, MissingWeightsError

log = logging.getLogger(__name__)

HUB_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
DEFAULT_TEMPLATE = "this is a photo of {}"  # the model card's zero-shot template
CONFIG_NAME = "open_clip_config.json"


def read_text_cfg(folder: str | Path) -> dict:
    """The ``model_cfg.text_cfg`` of a folder's open_clip_config.json; BadInputError if it is unreadable."""
    path = Path(folder) / CONFIG_NAME
    try:
        text_cfg = json.loads(path.read_text(encoding="utf-8"))["model_cfg"]["text_cfg"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        reason = f"no {exc}" if isinstance(exc, KeyError) else type(exc).__name__
        raise BadInputError(f"{path} is not a usable open_clip config ({reason})") from None
    if not isinstance(text_cfg, dict):
        raise BadInputError(f"{path} is not a usable open_clip config (model_cfg.text_cfg is not a mapping)")
    return text_cfg


def text_tower_repos(folder: str | Path) -> dict[str, str]:
    """Hub repos (by config key) whose config/tokenizer files the folder's text tower reads; {} if unreadable."""
    try:
        text_cfg = read_text_cfg(folder)
    except BadInputError:  # `fetch` and `check` report the repos they can name; loading reports the bad file
        return {}
    return {key: text_cfg[key] for key in ("hf_model_name", "hf_tokenizer_name") if text_cfg.get(key)}


def _text_cfg_override(folder: Path, text_config: str | None) -> dict:
    """Point the text tower at a local folder: ``text_config``, or the Hub model's cached snapshot.

    open_clip would otherwise ask the Hub for the text model's config (with network retries on an
    offline machine); like weights, it is never downloaded at load time.
    """
    text_cfg = read_text_cfg(folder)
    if "hf_model_name" not in text_cfg:  # open_clip's own text transformer: nothing to look up
        return {}
    local = text_config or _cached_hub_folder(text_cfg["hf_model_name"])
    # The full checkpoint brings the text weights: do not ask transformers for pretrained ones.
    return {"text_cfg": {**text_cfg, "hf_model_name": local, "hf_model_pretrained": False}}


def _cached_hub_folder(name: str) -> str:
    if Path(name).is_dir():
        return name
    import huggingface_hub

    found = huggingface_hub.try_to_load_from_cache(name, "config.json")
    if not isinstance(found, str):
        raise MissingWeightsError(
            f"BiomedCLIP's text tower config ({name}) is not in the huggingface_hub cache. Download it once "
            f"(`hf download {name} config.json`) or set text_config to a folder holding that config.json.")
    return str(Path(found).parent)


def load_open_clip(folder: str | Path, text_config: str | None = None, device: str = "cpu"):
    """Load any open_clip model folder strictly; returns ``(model, preprocess)`` in eval mode.

    Also the llava family's vision tower. ``text_config``: optional local folder with the text
    tower's ``config.json`` (for a Hugging Face text tower; otherwise the Hub model named in the
    folder's config must be in the huggingface_hub cache, MissingWeightsError if not).
    """
    import open_clip  # deferred: heavy import, only needed for this model

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise BadInputError(f"{folder} is not an open_clip model folder: it has no {CONFIG_NAME}")
    if not any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):  # open_clip's glob
        raise MissingWeightsError(f"{folder} has {CONFIG_NAME} but no weights file (open_clip_pytorch_model.bin):"
                                  f" copy it from the Hub repo {HUB_ID} or run `xraygpt fetch`.")
    overrides = _text_cfg_override(folder, text_config)
    try:
        # create_model_from_pretrained loads the checkpoint strictly (open_clip's load_checkpoint).
        model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}", device=device, **overrides)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:  # KeyError: e.g. no vision_cfg
        raise BadInputError(f"cannot load the open_clip model in {folder}: {_reason(exc)}") from None
    return model.eval(), preprocess


def _reason(exc: Exception) -> str:
    return f"no {exc}" if isinstance(exc, KeyError) else (str(exc).splitlines() or [type(exc).__name__])[0]


def load_biomedclip(folder: str | Path, text_config: str | None = None, device: str = "cpu"):
    """Load an open_clip model folder with its tokenizer; returns ``(model, preprocess, tokenizer)``."""
    import open_clip

    model, preprocess = load_open_clip(folder, text_config, device)
    try:
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise BadInputError(f"cannot load the open_clip tokenizer in {folder}: {_reason(exc)}") from None
    log.info("BiomedCLIP loaded (context length %d)", tokenizer.context_length)
    return model, preprocess, tokenizer


class BiomedCLIPEncoder:
    """Adapter with the zero-shot encoder interface: normalised image/text embeddings and a logit scale."""

    default_template = DEFAULT_TEMPLATE

    def __init__(self, model, preprocess, tokenizer, device: str = "cpu") -> None:
        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 3, 224, 224) model input; images are converted to RGB as open_clip's transform expects."""
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised float32 embeddings of preprocessed pixels, on the model's device (differentiable)."""
        return self.model.encode_image(pixels.to(self.device), normalize=True).float()

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised embeddings; images are converted to RGB as open_clip's transform expects."""
        return self.embed_pixels(self.pixel_values(images)).cpu()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P, D) L2-normalised embeddings of one class's prompts."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu()

    def logit_scale(self) -> float:
        """exp(logit_scale), as in the model card's zero-shot example."""
        return float(self.model.logit_scale.detach().exp())


def load_encoder(folder: str | Path, text_config: str | None = None, device: str = "cpu") -> BiomedCLIPEncoder:
    """A ready BiomedCLIPEncoder from an open_clip folder."""
    model, preprocess, tokenizer = load_biomedclip(folder, text_config, device)
    return BiomedCLIPEncoder(model, preprocess, tokenizer, device)

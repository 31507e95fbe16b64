"""MedKLIP (Wu et al., ICCV 2023) rebuilt from library classes, loading its released ``checkpoint_final.pth``.

- Image: torchvision ResNet-18 or ResNet-50 up to ``layer3`` (14 x 14 tokens at 224 px), then
  ``res_l1`` -> ReLU -> ``res_l2`` to ``d_model``.
- Queries: one per entity, ``disease_embedding_layer`` of the [CLS] state of BERT on the entity's
  description (see :mod:`.medklip_text`); they are inputs, not weights.
- Decoder: torch's ``nn.TransformerDecoder`` of pre-norm (``norm_first``) layers with a final
  LayerNorm: the same parameter names and maths as MedKLIP's DETR-style decoder (no positional
  encodings). We run its layers step by step to keep each cross-attention map, sequence-first and
  with the same ``nn.MultiheadAttention`` calls as MedKLIP, so that float32 rounds as MedKLIP's
  does: a ReLU input a few 1e-9 from zero takes the reference's side (see :func:`_decoder_layer`).
- ``classifier``: 2 logits per entity; softmax index 1 = present.

Module names equal the released ones without DataParallel's ``module.``, so gradient norms and saved
checkpoints use MedKLIP's own parameter names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

from ..checkpoints import CheckpointKeyError, load_exact
from ..errors import BadInputError

log = logging.getLogger(__name__)

IMAGE_SIZE = 224  # MedKLIP squeezes every image to 224 x 224 (aspect ratio not kept)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FFN_SIZE = 1024  # hard-coded in MedKLIP's model (not in its config); read from the weights anyway
DECODER_DROPOUT = 0.1  # hard-coded too; the config's ``dropout`` is the one after the decoder
DEFAULT_HEADS = 4  # MedKLIP_config.yaml ``H``: the state dict cannot tell the head count
GROUNDING_LAYERS = 4  # the grounding test averages the last four decoder layers' cross-attention
# The ResNets MedKLIP offers (``res_base_model``) and how to tell them apart in a state dict:
# blocks in layer3 (res_features.6) and whether a block has a third convolution (bottleneck).
RESNETS = {"resnet18": (torchvision.models.resnet18, 2, False), "resnet50": (torchvision.models.resnet50, 6, True)}
KNOWN_PREFIXES = ("res_features.", "res_l1.", "res_l2.", "disease_embedding_layer.", "cl_fc.", "decoder.layers.",
                  "decoder.norm.", "classifier.")
# Entries of a training checkpoint besides the weights; read (config) or left alone (optimizer state).
CHECKPOINT_ENTRIES = frozenset({"model", "config", "epoch", "optimizer", "lr_scheduler"})


@dataclass(frozen=True)
class MedKLIPSizes:
    """What the architecture needs, read from the state dict (and ``heads`` from the checkpoint's config)."""

    backbone: str
    d_model: int
    layers: int
    heads: int
    text_dim: int
    classes: int
    ffn: int = FFN_SIZE


@dataclass
class MedKLIPOutput:
    """``logits`` (B, E, classes); ``attentions``: per decoder layer, (B, E, tokens) averaged over heads."""

    logits: torch.Tensor
    attentions: list[torch.Tensor]

    def probabilities(self) -> torch.Tensor:
        """(B, E) positive-class probability (softmax over the two logits, index 1), as MedKLIP's test."""
        return self.logits.softmax(dim=-1)[..., 1]

    def grounding(self, layers: int = GROUNDING_LAYERS) -> torch.Tensor:
        """(B, E, h, w): the mean cross-attention of the last ``layers`` layers on the square token grid."""
        used = self.attentions[-layers:]
        mean = torch.stack(used).mean(dim=0)
        side = int(round(mean.shape[-1] ** 0.5))
        return mean.reshape(*mean.shape[:2], side, side)


class MedKLIP(nn.Module):
    """MedKLIP's network; ``forward(pixel_values, entity_embeddings)`` -> logits and attention maps."""

    def __init__(self, sizes: MedKLIPSizes, dropout: float = 0.1) -> None:
        super().__init__()
        self.sizes = sizes
        factory = RESNETS[sizes.backbone][0]
        resnet = factory(weights=None)
        # conv1, bn1, relu, maxpool, layer1..3: MedKLIP drops avgpool, fc and layer4 (indices 0..6 in its keys)
        self.res_features = nn.Sequential(*list(resnet.children())[:-3])
        features = resnet.fc.in_features // 2  # layer3's channels: 256 (ResNet-18) or 1024 (ResNet-50)
        self.res_l1 = nn.Linear(features, features)
        self.res_l2 = nn.Linear(features, sizes.d_model)
        self.disease_embedding_layer = nn.Linear(sizes.text_dim, sizes.d_model)
        # MedKLIP's contrastive head: unused for scores, kept so the released file loads strictly and saves back
        self.cl_fc = nn.Linear(sizes.d_model, sizes.text_dim)
        layer = nn.TransformerDecoderLayer(sizes.d_model, sizes.heads, sizes.ffn, DECODER_DROPOUT, activation="relu",
                                           batch_first=False, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, sizes.layers, norm=nn.LayerNorm(sizes.d_model))
        self.dropout_feas = nn.Dropout(dropout)
        self.classifier = nn.Linear(sizes.d_model, sizes.classes)

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, h*w, d_model) image tokens: layer3's grid, row-major, through res_l1 -> ReLU -> res_l2."""
        grid = self.res_features(pixel_values)
        tokens = grid.flatten(2).transpose(1, 2)
        return self.res_l2(torch.relu(self.res_l1(tokens)))

    def forward(self, pixel_values: torch.Tensor, entity_embeddings: torch.Tensor) -> MedKLIPOutput:
        """Logits of every entity whose text embedding (E, text_dim) is given, and each layer's attention.

        The queries attend to each other (decoder self-attention): an entity's score depends on the whole
        query set, so MedKLIP's scores are those of its full entity list.
        """
        return self.decode(self.image_tokens(pixel_values), entity_embeddings)

    def decode(self, memory: torch.Tensor, entity_embeddings: torch.Tensor) -> MedKLIPOutput:
        """The decoder and classifier on image tokens from :meth:`image_tokens` (reused across query sets)."""
        queries = self.disease_embedding_layer(entity_embeddings.to(memory.dtype))
        # sequence-first (entities, batch, d_model) and (tokens, batch, d_model), laid out as MedKLIP's own
        # forward lays them out (repeated queries, transposed image tokens): see _decoder_layer
        x = queries.unsqueeze(1).repeat(1, memory.shape[0], 1)
        memory = memory.transpose(0, 1)
        attentions = []
        for layer in self.decoder.layers:
            x, weights = _decoder_layer(layer, x, memory)
            attentions.append(weights)
        x = self.decoder.norm(x)
        return MedKLIPOutput(self.classifier(self.dropout_feas(x)).transpose(0, 1), attentions)


def _decoder_layer(layer: nn.TransformerDecoderLayer, x: torch.Tensor, memory: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm layer as ``nn.TransformerDecoderLayer(norm_first=True)`` computes it, keeping the
    cross-attention weights (torch's own forward asks for none); ``x`` and ``memory`` sequence-first.

    Both attentions go through the explicit-softmax path (``need_weights=True``) in MedKLIP's layout,
    as MedKLIP's decoder calls them: the maths is the same as torch's fused path, the float32 rounding
    is not. It matters for training: in the fixture's batch one FFN ReLU input of layer 2 is -4e-9 in
    float64, so float32 puts it on either side of zero by summation order, and whether it passes gradient
    moves every gradient below the classifier by up to 1e-4 (relative). Computing as MedKLIP does puts
    it on MedKLIP's side: its recorded gradient norms are then met within 5e-7.
    """
    h = layer.norm1(x)
    x = x + layer.dropout1(layer.self_attn(h, h, h)[0])
    h = layer.norm2(x)
    attended, weights = layer.multihead_attn(h, memory, memory, need_weights=True, average_attn_weights=True)
    x = x + layer.dropout2(attended)
    h = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x)))))
    return x + layer.dropout3(h), weights


# --- the released file -------------------------------------------------------------------------

def read_medklip_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``model`` state dict and the ``config`` dict (empty if absent) of a MedKLIP checkpoint.

    Tensors only (``weights_only``); memory-mapped, so the optimizer state of a training checkpoint
    is never read into memory.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for corrupt, truncated or unsafe pickles
        raise BadInputError(f"cannot read MedKLIP checkpoint {Path(path).name}: "
                            f"{str(exc).splitlines()[0][:200]}") from None
    if not isinstance(data, Mapping) or "model" not in data:
        found = sorted(data)[:5] if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointKeyError(f"{Path(path).name}: not a MedKLIP checkpoint ({{'model': state_dict, ...}}); "
                                 f"found {found}")
    unknown = sorted(set(data) - CHECKPOINT_ENTRIES)
    if unknown:
        raise CheckpointKeyError(f"{Path(path).name}: unknown checkpoint entries {unknown}")
    config = data.get("config") or {}
    return dict(data["model"]), dict(config) if isinstance(config, Mapping) else {}


def remap_medklip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released MedKLIP keys (``module.``-prefixed by DataParallel, or bare) -> this module's names.

    Pure: the input is not changed. Raises CheckpointKeyError naming keys outside MedKLIP's layout.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        if name.startswith(KNOWN_PREFIXES):
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointKeyError(f"not a MedKLIP checkpoint: unexpected keys {unknown[:5]}"
                                 f"{' ...' if len(unknown) > 5 else ''}")
    return out


def detect_sizes(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> MedKLIPSizes:
    """Architecture sizes from a remapped state dict; the head count from the checkpoint's config (``H``)."""
    try:
        d_model, text_dim = state_dict["disease_embedding_layer.weight"].shape
        classes = state_dict["classifier.weight"].shape[0]
        ffn = state_dict["decoder.layers.0.linear1.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointKeyError(f"not a MedKLIP checkpoint: no {exc.args[0]}") from None
    layers = len({k.split(".")[2] for k in state_dict if k.startswith("decoder.layers.")})
    backbone = _backbone(state_dict)
    named = config.get("res_base_model")
    if named and named != backbone:
        raise BadInputError(f"the checkpoint's config says {named}, but its weights are a {backbone}")
    heads = int(config.get("H", DEFAULT_HEADS))
    if "H" not in config:
        log.info("MedKLIP checkpoint without config.H: using MedKLIP's %d heads", DEFAULT_HEADS)
    if d_model % heads:
        raise BadInputError(f"MedKLIP d_model {d_model} is not divisible by its {heads} heads (config H)")
    return MedKLIPSizes(backbone, int(d_model), layers, heads, int(text_dim), int(classes), int(ffn))


def _backbone(state_dict: Mapping[str, torch.Tensor]) -> str:
    blocks = len({k.split(".")[2] for k in state_dict if k.startswith("res_features.6.")})
    bottleneck = "res_features.6.0.conv3.weight" in state_dict
    for name, (_, count, is_bottleneck) in RESNETS.items():
        if blocks == count and bottleneck == is_bottleneck:
            return name
    raise BadInputError(f"unsupported MedKLIP image backbone ({blocks} blocks in layer3, "
                        f"{'bottleneck' if bottleneck else 'basic'}): MedKLIP offers resnet18 and resnet50")


def build_medklip(weights_path: str | Path) -> MedKLIP:
    """MedKLIP in evaluation mode with the released weights loaded strictly."""
    released, config = read_medklip_checkpoint(weights_path)
    state_dict = remap_medklip_state_dict(released)
    sizes = detect_sizes(state_dict, config)
    model = MedKLIP(sizes, dropout=float(config.get("dropout", 0.1)))
    load_exact(model, state_dict, "MedKLIP checkpoint")
    log.info("MedKLIP loaded: %s, d_model %d, %d layers x %d heads", sizes.backbone, sizes.d_model, sizes.layers,
             sizes.heads)
    return model.eval()


# --- images ------------------------------------------------------------------------------------

PREPROCESS = transforms.Compose([
    transforms.Resize([IMAGE_SIZE, IMAGE_SIZE]),  # bilinear on the PIL image; the aspect ratio is not kept
    transforms.ToTensor(),
    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])


def medklip_preprocess(image: Image.Image) -> torch.Tensor:
    """(3, 224, 224): MedKLIP's test transform of ``image.convert('RGB')``."""
    return PREPROCESS(image.convert("RGB"))

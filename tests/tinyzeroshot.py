"""Tiny zero-shot models of the real architectures in the released file layouts (random weights, no downloads).

- MedCLIP-ResNet: torchvision ``resnet50`` + a tiny BERT in MedCLIP's ``pytorch_model.bin`` key layout
  (transformers 4.24 buffers included), inside a zip shaped like the released ``medclip-pretrained.zip``;
- BiomedCLIP: ``tinyllava.write_tower`` (an open_clip folder in the released layout, tiny timm ViT 224/16).
The tiny MedCLIP-ViT (Swin) is the shared fixture ``../shared/fixtures/medclip_tiny``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
import torchvision
import yaml
from helpers import SHARED
from torch import nn
from transformers import AutoConfig, BertModel

FIXTURE = SHARED / "fixtures" / "medclip_tiny"  # callers hold the shared_dir fixture (conftest)
BERT_TINY = FIXTURE / "bert_tiny"


def medclip_resnet_zip(folder: Path) -> tuple[Path, nn.Module]:
    """A MedCLIP-ResNet ``pytorch_model.bin`` (real resnet50, tiny BERT) inside a released-style zip."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    resnet.fc = nn.Linear(2048, 64, bias=False)
    resnet.eval()
    bert = BertModel(AutoConfig.from_pretrained(BERT_TINY))
    state = {f"vision_model.model.{k}": v for k, v in resnet.state_dict().items()}
    state |= {f"text_model.model.{k}": v for k, v in bert.state_dict().items()}
    state["text_model.model.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)  # as 4.24 stored it
    state["text_model.projection_head.weight"] = torch.randn(64, 32)
    state["logit_scale"] = torch.tensor(4.0)
    inner = folder / "pytorch_model.bin"
    torch.save(state, inner)
    archive = folder / "medclip-pretrained.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as handle:
        handle.write(inner, "medclip-pretrained/pytorch_model.bin")
    inner.unlink()
    return archive, resnet


def three_kinds_config(root: Path, tiny_config: Path) -> Path:
    """A YAML config with the tiny MedCLIP-ViT fixture, a MedCLIP-ResNet and a tiny BiomedCLIP (one of each kind)."""
    import tinyllava  # the BiomedCLIP open_clip folder writer

    archive, _ = medclip_resnet_zip(root)
    folder, text_dir, _ = tinyllava.write_tower(root)
    config = yaml.safe_load(tiny_config.read_text())
    vit = config["zeroshot"]["models"]["medclip-vit"]
    for key in ("weights", "vision_config", "text_config"):
        vit[key] = str((tiny_config.parent / vit[key]).resolve())
    config["zeroshot"]["models"] |= {
        "medclip-resnet": {"kind": "medclip-resnet", "weights": str(archive), "text_config": vit["text_config"]},
        "biomedclip": {"kind": "biomedclip", "weights": str(folder), "text_config": str(text_dir)}}
    path = root / "zs.yaml"
    path.write_text(yaml.safe_dump(config))
    return path

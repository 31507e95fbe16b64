"""cast_vision gives every ViT tensor XrayGPT's dtype per mode, converting tensor by tensor (also for CUDA modes,
planned here without a GPU on the meta device)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xraygpt_app.config import RuntimeConfig, VisionConfig
from xraygpt_app.families.xraygpt.vision import VisionTower, cast_vision
from xraygpt_app.placement import plan_placement

TINY = VisionConfig(image_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2)


def _dtypes(mode: str, cuda: bool, precision: str = "fp16") -> dict[str, set[torch.dtype]]:
    config = VisionConfig(**{**TINY.__dict__, "precision": precision})
    with torch.device("meta"):
        tower = VisionTower(config)
    cast_vision(tower, plan_placement(RuntimeConfig(mode=mode), config, cuda_available=cuda))
    groups: dict[str, set[torch.dtype]] = {"linear": set(), "other eva": set(), "ln_vision": set()}
    for name, module in tower.named_modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if not tensor.is_floating_point():
                continue
            group = ("ln_vision" if name.startswith("ln_vision") else
                     "linear" if isinstance(module, (nn.Linear, nn.Conv2d)) else "other eva")
            groups[group].add(tensor.dtype)
    return groups


@pytest.mark.parametrize(("mode", "cuda", "precision", "linear", "other"), [
    ("fp16", True, "fp16", torch.float16, torch.float32),  # rounded weights kept half, computed under autocast
    ("8bit", True, "fp16", torch.float16, torch.float32),
    ("bf16", False, "fp16", torch.float32, torch.float32),  # fp16-rounded weights computed in float32 on the CPU
    ("low_resource", True, "fp16", torch.float32, torch.float32),
    ("fp16", True, "fp32", torch.float16, torch.float16),  # vision.precision fp32 follows the mode's dtype
    ("bf16", False, "fp32", torch.bfloat16, torch.bfloat16),
    ("fp32", False, "fp16", torch.float32, torch.float32),
])
def test_vit_dtypes_per_mode(mode, cuda, precision, linear, other) -> None:
    groups = _dtypes(mode, cuda, precision)
    assert groups == {"linear": {linear}, "other eva": {other}, "ln_vision": {torch.float32}}


def test_cpu_weights_are_rounded_to_float16() -> None:
    """On the CPU the Linear weights are float32 but hold float16-representable values (the reference's rounding)."""
    torch.manual_seed(0)
    tower = VisionTower(TINY)
    original = tower.eva.blocks[0].mlp.fc1.weight.detach().clone()
    cast_vision(tower, plan_placement(RuntimeConfig(mode="bf16"), TINY, cuda_available=False))
    weight = tower.eva.blocks[0].mlp.fc1.weight
    assert weight.dtype == torch.float32 and weight.requires_grad  # kept: place_vision freezes for inference
    torch.testing.assert_close(weight, original.half().float(), rtol=0, atol=0)
    assert not torch.equal(weight, original)

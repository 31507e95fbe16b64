"""EVA ViT-g from timm plus BLIP-2's ``ln_vision``, and XrayGPT's image preprocessing."""

from __future__ import annotations

import contextlib
import functools

import timm.models.eva
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from ...config import VisionConfig
from ...imaging.loader import model_ready
from ...placement import Placement


def build_preprocess(config: VisionConfig) -> transforms.Compose:
    """BLIP-2's eval transform: bicubic resize to a square (aspect not kept), CLIP mean/std."""
    return transforms.Compose([
        transforms.Resize((config.image_size, config.image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(config.mean, config.std),
    ])


@functools.lru_cache(maxsize=8)
def _cached_preprocess(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> transforms.Compose:
    # Keyed by value, not by the (mutable, unhashable) config: built once per image geometry, not per upload.
    return build_preprocess(VisionConfig(image_size=image_size, mean=mean, std=std))


def preprocess(image: Image.Image, config: VisionConfig) -> torch.Tensor:
    """PIL image (any mode) -> ``(1, 3, S, S)`` float32 tensor, as XrayGPT's ``upload_img``.

    The loader's 8-bit images go straight to ``convert("RGB")`` as in the reference; other modes (a raw
    16-bit PNG from the Python API) are first scaled to 8 bits as the loader does, not clipped to white.
    """
    transform = _cached_preprocess(config.image_size, tuple(config.mean), tuple(config.std))
    return transform(model_ready(image).convert("RGB")).unsqueeze(0)


def build_eva(config: VisionConfig) -> timm.models.eva.Eva:
    """timm's ``Eva`` with LAVIS's EVA ViT-g settings; LAVIS has no final norm."""
    model = timm.models.eva.Eva(
        img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.embed_dim,
        depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=True,
        use_rot_pos_emb=False, use_abs_pos_emb=True, num_classes=0, global_pool="",
        norm_layer=functools.partial(nn.LayerNorm, eps=config.norm_eps),
    )
    model.norm = nn.Identity()  # LAVIS comments the final norm out; its output is the last block's
    return model


class VisionTower(nn.Module):
    """EVA ViT followed by ``ln_vision`` (computed in float32, as LAVIS's LayerNorm does)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.eva = build_eva(config)
        self.ln_vision = nn.LayerNorm(config.embed_dim, eps=config.ln_vision_eps)
        self.autocast_dtype: torch.dtype | None = None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            pixel_values = pixel_values.to(self.eva.patch_embed.proj.weight.dtype)
        with self._autocast(pixel_values.device):
            tokens = self.eva.forward_features(pixel_values)
        return self.ln_vision(tokens.float())

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def place_vision(tower: VisionTower, placement: Placement) -> VisionTower:
    """Cast as :func:`cast_vision` does and move to the vision device, tensor by tensor, for inference."""
    return cast_vision(tower, placement, placement.vision_device).eval().requires_grad_(False)


def cast_vision(tower: VisionTower, placement: Placement, device: torch.device | None = None) -> VisionTower:
    """Apply XrayGPT's ViT precision: Conv/Linear weights rounded to float16, the rest float32.

    On CUDA the rounded weights stay float16 (computed under autocast); on the CPU they are computed
    in float32 (the reference's low-resource path). Each tensor is converted (and moved to
    ``device``) on its own, so loading never holds a float32 copy of the whole 1B-parameter tower.
    """
    tower.autocast_dtype = placement.vision_autocast_dtype
    eva = {id(m) for m in tower.eva.modules()}
    for module in tower.modules():
        rounding, storage = _vision_dtypes(module, id(module) in eva, placement)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point():
                value = tensor.detach().to(rounding).to(device=device, dtype=storage)
                setattr(module, name, nn.Parameter(value, tensor.requires_grad) if isinstance(tensor, nn.Parameter)
                        else value)
    return tower


def _vision_dtypes(module: nn.Module, in_eva: bool, placement: Placement) -> tuple[torch.dtype, torch.dtype]:
    """(rounding dtype, storage dtype) of one module's own tensors."""
    if not in_eva:
        return torch.float32, torch.float32  # ln_vision: float32, as LAVIS's LayerNorm computes
    if placement.vision_half_weights:
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            return torch.float32, torch.float32
        return torch.float16, (torch.float32 if placement.vision_autocast_dtype is None else torch.float16)
    return placement.vision_dtype, placement.vision_dtype


def build_train_transform(config: VisionConfig) -> transforms.Compose:
    """XrayGPT's ``blip2_image_train``: random resized crop (scale 0.5-1.0, bicubic), CLIP mean/std."""
    return transforms.Compose([
        transforms.RandomResizedCrop(config.image_size, scale=(0.5, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(config.mean, config.std),
    ])

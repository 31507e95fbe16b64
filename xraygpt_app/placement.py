"""One decision for every runtime mode: which dtype and device each part runs in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import RuntimeConfig, VisionConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """Where and how each part runs.

    ``vision_half_weights`` rounds the ViT's Conv/Linear weights to float16 as XrayGPT's
    ``vit_precision: fp16`` does; on CUDA they stay half and run under autocast, on the CPU they
    are cast back to float32 (the reference's low-resource path).
    """

    mode: str
    vision_device: torch.device
    vision_dtype: torch.dtype
    vision_half_weights: bool
    llm_device: torch.device  # where input embeddings go
    llm_dtype: torch.dtype  # compute dtype of the LLM (and of the spliced embeddings)
    llm_quantization: str | None  # None | "8bit" | "4bit"

    @property
    def llm_device_map(self) -> str | dict[str, str]:
        """``device_map`` for ``from_pretrained``: the whole LLM on one device."""
        return {"": str(self.llm_device)}

    @property
    def vision_autocast_dtype(self) -> torch.dtype | None:
        """The ViT runs under autocast on CUDA when it is not float32 (the reference's fp16 ViT only does)."""
        if self.vision_device.type != "cuda" or self.vision_dtype == torch.float32:
            return None
        return self.vision_dtype

    @property
    def bridge_autocast_dtype(self) -> torch.dtype | None:
        """XrayGPT runs the Q-Former and projection under fp16 autocast whenever they are on a GPU."""
        return torch.float16 if self.llm_device.type == "cuda" else None


def plan_placement(runtime: RuntimeConfig, vision: VisionConfig, cuda_available: bool | None = None) -> Placement:
    """Turn ``runtime.mode``/``runtime.device`` into a :class:`Placement`.

    Modes: ``fp16`` (CUDA), ``8bit``/``4bit`` (bitsandbytes LLM), ``low_resource`` (ViT in float32
    on the CPU, 8-bit LLM, as MiniGPT-4 does and XrayGPT's comment intends), ``fp32``/``bf16``
    (CPU or CUDA), ``auto`` (fp16 on CUDA, fp32 on the CPU). ``runtime.vision_device: cpu`` keeps
    the ViT in float32 on the CPU in any mode (the image is encoded once per upload).
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    device = main_device(runtime.device, cuda)
    mode = runtime.mode
    if mode == "auto":
        mode = "fp16" if device.type == "cuda" else "fp32"
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("runtime.mode fp16 needs a CUDA GPU; on the CPU use fp32 or bf16")
    half_vit = vision.precision == "fp16"
    cpu = torch.device("cpu")
    if mode == "low_resource" or runtime.vision_device == "cpu":
        llm = plan_placement(RuntimeConfig("8bit" if mode == "low_resource" else mode, runtime.device), vision, cuda)
        return dataclasses.replace(llm, mode=mode, vision_device=cpu, vision_dtype=torch.float32)
    if mode in ("8bit", "4bit"):
        return Placement(mode, device, _half_or_float(device), half_vit, device, _half_or_float(device), mode)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[mode]
    vision_dtype = torch.float16 if (half_vit and device.type == "cuda") else dtype
    return Placement(mode, device, vision_dtype, half_vit, device, dtype, None)


def main_device(name: str, cuda: bool) -> torch.device:
    """``runtime.device`` as a torch device (``auto``: CUDA when present); ConfigError for CUDA without a GPU."""
    if name == "auto":
        return torch.device("cuda:0" if cuda else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not cuda:
        raise ConfigError(f"runtime.device is {name!r} but no CUDA GPU is available")
    return torch.device("cuda:0") if str(device) == "cuda" else device


def _half_or_float(device: torch.device) -> torch.dtype:
    # Quantised layers compute in float16 on a GPU; the CPU kernels want float32.
    return torch.float16 if device.type == "cuda" else torch.float32


def runtime_device(runtime: RuntimeConfig) -> torch.device:
    """The device ``runtime.device`` names on this machine (the zero-shot models run there)."""
    return main_device(runtime.device, torch.cuda.is_available())

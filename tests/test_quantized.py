"""8-bit / 4-bit / low-resource paths on the CPU (bitsandbytes >= 0.45 has CPU kernels) and the
placement decision for every runtime mode."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import tinymodels as tm
import torch
from PIL import Image

from xraygpt_app.api import Assistant
from xraygpt_app.config import RUNTIME_MODES, RuntimeConfig, VisionConfig
from xraygpt_app.errors import ConfigError
from xraygpt_app.placement import plan_placement

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")
IDS = torch.tensor([[1, 5, 60, 700, 33, 8, 400, 12]])
CPU, CUDA = torch.device("cpu"), torch.device("cuda:0")


@pytest.fixture(scope="module")
def quant_models(quant_xraygpt: tm.TinyModels) -> tm.TinyModels:
    """The session's tiny XrayGPT whose LLM dims are multiples of 64 (bitsandbytes' 4-bit block size)."""
    return quant_xraygpt


def _decoder_linears(llm: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in llm.named_modules() if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]


def _relative_error(model: Assistant, reference: torch.nn.Module) -> float:
    with torch.inference_mode():
        ours, expected = model.model.llm(IDS).logits.float(), reference(IDS).logits
    return float((ours - expected).norm() / expected.norm())


def _report(model: Assistant):
    return model.report(Image.linear_gradient("L").resize((96, 80)), do_sample=False, max_new_tokens=6)


@pytest.mark.parametrize("mode", ["8bit", "low_resource"])
def test_8bit_llm_on_cpu(quant_models: tm.TinyModels, mode: str) -> None:
    model = Assistant.from_config(quant_models.config, [f"runtime.mode={mode}"])
    linears = _decoder_linears(model.model.llm)
    per_layer = 7  # q, k, v, o, gate, up, down
    assert len(linears) == per_layer * quant_models.dims.llm_layers
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in linears)
    assert all(m.weight.dtype == torch.int8 for m in linears)
    assert model.model.placement.llm_quantization == "8bit"
    assert _relative_error(model, quant_models.llm) < 0.15  # int8 rounding, not a different model
    result = _report(model)
    assert 0 < len(result.token_ids) <= 6
    assert isinstance(result.answer, str)


def test_low_resource_vision_is_float32_on_cpu(quant_models: tm.TinyModels) -> None:
    vision = Assistant.from_config(quant_models.config, ["runtime.mode=low_resource"]).model.vision
    params = list(vision.parameters())
    assert all(p.device == CPU and p.dtype == torch.float32 for p in params)
    # XrayGPT's vit_precision fp16: the ViT's Conv/Linear weights are rounded to float16 first.
    weights = [m.weight for m in vision.eva.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert all(torch.equal(w, w.half().float()) for w in weights)


def test_4bit_nf4_llm_on_cpu(quant_models: tm.TinyModels) -> None:
    model = Assistant.from_config(quant_models.config, ["runtime.mode=4bit"])
    linears = _decoder_linears(model.model.llm)
    assert linears
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert all(m.weight.quant_type == "nf4" for m in linears)
    assert _relative_error(model, quant_models.llm) < 0.6  # 4-bit is coarse; an unrelated model gives ~1.4
    result = _report(model)
    assert 0 < len(result.token_ids) <= 6
    assert isinstance(result.answer, str)


# --- plan_placement ----------------------------------------------------------------------------------
# (mode, cuda) -> vision device/dtype, half ViT weights, LLM device/dtype, quantization
EXPECTED = {
    ("auto", True): (CUDA, torch.float16, True, CUDA, torch.float16, None),
    ("auto", False): (CPU, torch.float32, True, CPU, torch.float32, None),
    ("fp16", True): (CUDA, torch.float16, True, CUDA, torch.float16, None),
    ("8bit", True): (CUDA, torch.float16, True, CUDA, torch.float16, "8bit"),
    ("8bit", False): (CPU, torch.float32, True, CPU, torch.float32, "8bit"),
    ("4bit", True): (CUDA, torch.float16, True, CUDA, torch.float16, "4bit"),
    ("4bit", False): (CPU, torch.float32, True, CPU, torch.float32, "4bit"),
    ("low_resource", True): (CPU, torch.float32, True, CUDA, torch.float16, "8bit"),
    ("low_resource", False): (CPU, torch.float32, True, CPU, torch.float32, "8bit"),
    ("fp32", True): (CUDA, torch.float16, True, CUDA, torch.float32, None),
    ("fp32", False): (CPU, torch.float32, True, CPU, torch.float32, None),
    ("bf16", True): (CUDA, torch.float16, True, CUDA, torch.bfloat16, None),
    ("bf16", False): (CPU, torch.bfloat16, True, CPU, torch.bfloat16, None),
}


def test_expected_table_covers_every_mode() -> None:
    assert {mode for mode, _ in EXPECTED} == set(RUNTIME_MODES)


@pytest.mark.parametrize("mode, cuda", sorted(EXPECTED))
def test_plan_placement(mode: str, cuda: bool) -> None:
    placement = plan_placement(RuntimeConfig(mode=mode), VisionConfig(), cuda_available=cuda)
    got = (placement.vision_device, placement.vision_dtype, placement.vision_half_weights, placement.llm_device,
           placement.llm_dtype, placement.llm_quantization)
    assert got == EXPECTED[(mode, cuda)]
    assert placement.llm_device_map == {"": str(EXPECTED[(mode, cuda)][3])}
    assert placement.mode == (("fp16" if cuda else "fp32") if mode == "auto" else mode)


def test_fp16_without_cuda_is_config_error() -> None:
    with pytest.raises(ConfigError, match="fp16"):
        plan_placement(RuntimeConfig(mode="fp16"), VisionConfig(), cuda_available=False)


def test_cuda_device_without_cuda_is_config_error() -> None:
    with pytest.raises(ConfigError, match="runtime.device"):
        plan_placement(RuntimeConfig(mode="fp32", device="cuda:1"), VisionConfig(), cuda_available=False)


def test_explicit_devices() -> None:
    on_gpu1 = plan_placement(RuntimeConfig(mode="8bit", device="cuda:1"), VisionConfig(), cuda_available=True)
    assert on_gpu1.llm_device == torch.device("cuda:1")
    assert on_gpu1.vision_device == torch.device("cuda:1")
    cpu_forced = plan_placement(RuntimeConfig(mode="auto", device="cpu"), VisionConfig(), cuda_available=True)
    assert cpu_forced.mode == "fp32"
    assert cpu_forced.llm_device == CPU


@pytest.mark.parametrize("mode", ["fp16", "8bit", "4bit"])
def test_vision_device_cpu_moves_only_the_vision_tower(mode: str) -> None:
    default = plan_placement(RuntimeConfig(mode=mode), VisionConfig(), cuda_available=True)
    split = plan_placement(RuntimeConfig(mode=mode, vision_device="cpu"), VisionConfig(), cuda_available=True)
    assert (split.vision_device.type, split.vision_dtype) == ("cpu", torch.float32)
    assert default.vision_device.type == "cuda"
    assert (split.llm_device, split.llm_dtype, split.llm_quantization) == (
        default.llm_device, default.llm_dtype, default.llm_quantization)


def test_vision_fp32_precision_keeps_full_weights() -> None:
    placement = plan_placement(RuntimeConfig(mode="fp32"), VisionConfig(precision="fp32"), cuda_available=True)
    assert not placement.vision_half_weights
    assert placement.vision_dtype == torch.float32


def test_fp16_mode_on_cpu_fails_through_the_loader(quant_models: tm.TinyModels) -> None:
    with pytest.raises(ConfigError, match="fp16"):
        Assistant.from_config(quant_models.config, ["runtime.mode=fp16", "runtime.device=cpu"])

"""Memory estimate: its weight figures against real loaded models, mode ordering, and ``xraygpt check``."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import tinymodels
import torch
from helpers import REPO, TINY_CONFIG

from xraygpt_app.cli import main
from xraygpt_app.config import load_config
from xraygpt_app.families.xraygpt.model import XrayGPTModel
from xraygpt_app.llm import load_llm
from xraygpt_app.memory import estimate, estimate_breakdown, estimate_peak_memory, memory_fit
from xraygpt_app.placement import plan_placement

REAL_CONFIG = REPO / "eval_configs" / "xraygpt_eval.yaml"
LLAMA_7B_PARAMS = 6_738_415_616  # LLaMA-7B / Vicuna-7B parameter count (published)


def _bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _tiny(mode: str, *extra: str):
    return load_config(TINY_CONFIG, [f"runtime.mode={mode}", *extra])


def test_weights_estimate_matches_the_loaded_fp32_model(shared_dir):
    config = load_config(TINY_CONFIG)
    model = XrayGPTModel.load(config)
    parts = estimate_breakdown(config, assume_cuda=False)["cpu"]
    params = sum(p.numel() * p.element_size() for m in (model.vision, model.bridge, model.llm) for p in m.parameters())
    estimated = parts["vision"] + parts["qformer"] + parts["llm_weights"]
    # The estimate also counts buffers (EVA's zero k bias, rotary inv_freq): a few hundred bytes here.
    assert params <= estimated <= params * 1.01
    assert parts["vision"] == _bytes(model.vision)
    assert parts["qformer"] == _bytes(model.bridge)
    assert parts["llm_weights"] == _bytes(model.llm)


def test_8bit_estimate_matches_bitsandbytes_footprint(shared_dir):
    config = _tiny("8bit")
    placement = plan_placement(config.runtime, config.vision, cuda_available=False)
    llm = load_llm(Path(config.weights.llama_model.sources[0]), config.llm, placement)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in llm.modules())
    # get_memory_footprint counts the int8 weights; the per-row float32 scales live beside them (SCB).
    scales = sum(m.weight.SCB.numel() * m.weight.SCB.element_size()
                 for m in llm.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    assert estimate_breakdown(config, assume_cuda=False)["cpu"]["llm_weights"] == llm.get_memory_footprint() + scales


def test_4bit_estimate_matches_bitsandbytes_footprint(shared_dir, tmp_path):
    dims = tinymodels.QUANT_DIMS  # NF4 on the CPU packs weights in blocks: dimensions multiple of 64
    folder = tinymodels.save_llama_safetensors(tinymodels.llama(dims), tmp_path / "llm")
    config = _tiny("4bit", f"weights.llama_model={folder}", f"llm.hidden_size={dims.llm_hidden}")
    placement = plan_placement(config.runtime, config.vision, cuda_available=False)
    llm = load_llm(folder, config.llm, placement)
    states = [m.weight.quant_state for m in llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert states
    statistics = sum(s.absmax.numel() * s.absmax.element_size() + s.code.numel() * s.code.element_size()
                     for s in states)
    estimated = estimate_breakdown(config, assume_cuda=False)["cpu"]["llm_weights"]
    assert estimated == llm.get_memory_footprint() + statistics


@pytest.mark.parametrize("path", [TINY_CONFIG, REAL_CONFIG])
def test_llm_weights_order_by_mode(path, shared_dir):
    llm = {mode: estimate_breakdown(load_config(path, [f"runtime.mode={mode}"]), assume_cuda=True)["cuda:0"]
           ["llm_weights"] for mode in ("fp32", "fp16", "bf16", "8bit", "4bit")}
    assert llm["fp32"] > llm["fp16"] > llm["8bit"] > llm["4bit"]
    assert llm["fp16"] == llm["bf16"]


def test_real_model_without_llm_folder_assumes_vicuna_7b(tmp_path):
    config = load_config(REAL_CONFIG, ["runtime.mode=fp16", f"weights.llama_model={tmp_path / 'absent'}"])
    result = estimate(config, assume_cuda=True)
    assert any("Vicuna-7B" in note for note in result.notes)
    gpu = result.breakdown["cuda:0"]
    # float16 parameters plus the float32 rotary buffers (a few hundred bytes)
    assert 0 <= gpu["llm_weights"] - LLAMA_7B_PARAMS * 2 < 2**12
    assert gpu["kv_cache"] == 2 * 32 * 4096 * 2000 * 2  # K and V, 32 layers, 4096 wide, 2000 tokens, fp16
    assert estimate_peak_memory(config, assume_cuda=True)["cuda:0"] == sum(gpu.values())


def test_low_resource_puts_the_vit_on_the_cpu_in_float32(tmp_path):
    overrides = [f"weights.llama_model={tmp_path / 'absent'}"]
    low = estimate_breakdown(load_config(REAL_CONFIG, ["runtime.mode=low_resource", *overrides]), assume_cuda=True)
    eight = estimate_breakdown(load_config(REAL_CONFIG, ["runtime.mode=8bit", *overrides]), assume_cuda=True)
    assert low["cuda:0"]["vision"] == 0 and low["cuda:0"]["llm_weights"] == eight["cuda:0"]["llm_weights"]
    # fp16 Conv/Linear on the GPU, float32 on the CPU: a bit under half the bytes on the GPU
    assert 0.5 < eight["cuda:0"]["vision"] / low["cpu"]["vision"] < 0.52


def test_check_prints_the_gpu_estimate(capsys, shared_dir):
    assert main(["check", "-c", str(TINY_CONFIG), "--set", "runtime.mode=8bit"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate on a CUDA GPU (mode 8bit; an estimate" in out
    assert "kv_cache" in out and "llm_weights" in out


GiB = 2**30


def test_an_estimate_too_big_for_the_machine_names_the_modes_that_would_fit(tmp_path):
    config = load_config(REAL_CONFIG, ["runtime.mode=fp32", f"weights.llama_model={tmp_path / 'absent'}"])
    peak = estimate_peak_memory(config, assume_cuda=False)  # Vicuna-7B in float32: about 32.6 GiB
    fit = memory_fit(config, peak, {"cpu": 23 * GiB})
    assert fit.capacity == {"cpu": 23 * GiB} and not fit.fits
    assert set(fit.alternatives) == {"bf16", "8bit", "low_resource", "4bit"}  # fp16 needs CUDA: not offered
    assert next(iter(fit.alternatives)) == "bf16"  # the most precise that fits comes first
    assert all(alternative["cpu"] <= 23 * GiB for alternative in fit.alternatives.values())
    assert memory_fit(config, peak, {"cpu": 40 * GiB}).fits
    assert memory_fit(config, peak, {"cpu": 4 * GiB}).alternatives == {}


def test_check_says_when_the_estimate_will_not_fit(monkeypatch, capsys, tmp_path):
    import xraygpt_app.memory as memory

    monkeypatch.setattr(memory, "device_capacity", lambda device: 23 * GiB if device == "cpu" else None)
    main(["check", "-c", str(REAL_CONFIG), "--set", "runtime.mode=fp32",
          "--set", f"weights.llama_model={tmp_path / 'absent'}"])
    out = capsys.readouterr().out
    assert "will NOT fit: this machine has cpu 23.00 GiB. Runtime modes that would fit" in out
    assert "    bf16: cpu " in out and "e.g. add --set runtime.mode=bf16" in out

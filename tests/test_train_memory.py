"""``xraygpt check --train``: the fine-tuning memory estimate counts what peft and the trainer really create."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model

from xraygpt_app.cli import main
from xraygpt_app.config import load_config
from xraygpt_app.families.xraygpt.model import resolve_model_weights
from xraygpt_app.llm import load_llm
from xraygpt_app.memory import TRAIN_MODES, TrainShape, estimate_training, llm_architecture, lora_parameters
from xraygpt_app.placement import plan_placement


def test_lora_count_is_what_peft_creates(tiny_config) -> None:
    config = load_config(tiny_config)
    llm = load_llm(resolve_model_weights(config).llama_model, config.llm, plan_placement(config.runtime, config.vision))
    targets = ("q_proj", "v_proj", "down_proj")
    peft_model = get_peft_model(llm, LoraConfig(r=4, target_modules=list(targets)))
    created = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora_parameters(llm_architecture(config)[0], TrainShape(lora_rank=4, lora_targets=targets)) == created


def test_training_modes_rank_as_expected(tiny_config) -> None:
    config = load_config(tiny_config)
    results = {mode: estimate_training(config, mode, TrainShape()) for mode in TRAIN_MODES}
    parts = {mode: r.breakdown["cuda:0"] for mode, r in results.items()}
    assert parts["projection fp16"]["trainable"] == 12 * (32 * 64 + 64)  # llama_proj: grad + two Adam moments
    assert parts["QLoRA 4-bit"]["llm_weights"] < parts["LoRA fp16"]["llm_weights"]
    assert parts["LoRA fp16"]["activations"] < parts["projection fp16"]["activations"]  # checkpointing
    bigger = estimate_training(config, "projection fp16", TrainShape(batch_size=4)).breakdown["cuda:0"]
    assert bigger["activations"] > 3 * parts["projection fp16"]["activations"]


def test_check_train_prints_every_mode(capsys: pytest.CaptureFixture, tiny_config) -> None:
    assert main(["check", "-c", str(tiny_config), "--train", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["training_memory_gpu_estimate"]
    assert set(report) == set(TRAIN_MODES) and all(r["peak_bytes"]["cuda:0"] > 0 for r in report.values())

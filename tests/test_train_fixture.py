"""XrayGPT's training loss and gradients on the tiny fixture, reproduced through our objective.

``../shared/fixtures/xraygpt_tiny/expected_train.json`` / ``expected_train_tensors.pt`` come from
XrayGPT's own ``MiniGPT4.forward`` (eval transform, fixed instruction per batch); tolerances as
its README: loss relative 1e-5, gradients ``atol = 1e-4 * max|grad|``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xraygpt_app.config import load_config
from xraygpt_app.families.xraygpt.vision import preprocess
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.train.config import TrainConfig
from xraygpt_app.train.xraygpt_objective import XrayGPTTrainable, read_instructions


@pytest.fixture(scope="module")
def expected(xraygpt_fixture_dir: Path) -> dict:
    return json.loads((xraygpt_fixture_dir / "expected_train.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def family(tiny_config) -> XrayGPTTrainable:
    family = XrayGPTTrainable.from_config(load_config(tiny_config), TrainConfig())
    return family.train()


def test_instruction_list_is_xraygpts() -> None:
    lines = read_instructions()
    assert len(lines) == 15
    assert all(line.startswith("<Img><ImageHere></Img> ") for line in lines)


def test_only_llama_proj_trains_by_default(family: XrayGPTTrainable, expected: dict) -> None:
    assert sorted(family.named_trainable()) == expected["trainable_parameters"]
    assert not family.vision.training
    assert not family.bridge.qformer.training


@pytest.mark.parametrize("index", range(4))
def test_loss_and_gradients_match_xraygpt(family: XrayGPTTrainable, expected: dict, samples_dir: Path,
                                          xraygpt_fixture_dir: Path, index: int) -> None:
    batch = expected["batches"][index]
    tensors = torch.load(xraygpt_fixture_dir / "expected_train_tensors.pt", weights_only=True)
    config = family.model.config
    pixels = torch.cat([preprocess(load_radiograph(samples_dir / name).image, config.vision)
                        for name in batch["images"]])
    instruction = family.instructions[batch["prompt_index"]]
    assert family.prompt_for(instruction) == batch["prompt"]
    prepared = family.training_batch(pixels, [instruction] * len(batch["images"]), batch["captions"])
    targets = prepared.labels[prepared.labels != -100].tolist()
    assert targets == [t for row in batch["target_token_ids"] for t in row if t != 2]
    family.zero_grad()
    loss, _ = family(pixels, [instruction] * len(batch["images"]), batch["captions"])
    loss.backward()
    assert loss.item() == pytest.approx(batch["loss"], rel=1e-5)
    for name, param in family.named_trainable().items():
        want = tensors[f"{index}.grad.{name}"]
        torch.testing.assert_close(param.grad, want, rtol=0, atol=1e-4 * want.abs().max().item())
        assert param.grad.norm().item() == pytest.approx(batch["grad_l2"][name], rel=1e-4)


def test_a_vqa_question_is_its_own_instruction(family: XrayGPTTrainable) -> None:
    prompt = family.prompt_for("Is there pleural effusion?")
    assert prompt == "###Patient: <Img><ImageHere></Img> Is there pleural effusion? ###Doctor: "

"""Fine-tuning the llava family on the tiny model: the objective against an independent computation,
a few steps on real radiographs, stage 2's LoRA, and a trained projector served through ``from_config``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import metric_records
from safetensors.torch import load_file
from transformers import AutoTokenizer

from xraygpt_app.api import Assistant
from xraygpt_app.checkpoints import CheckpointKeyError
from xraygpt_app.config import load_config
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.train.config import TrainConfig
from xraygpt_app.train.llava_objective import LlavaTrainable

IMAGES = ("nih_cxr14_00000001_000_pa_512.png", "covidcxr_ARDSSevere_rgb_790x631.png")
TARGETS = ("No acute cardiopulmonary abnormality.", "Bilateral diffuse airspace opacities.")
QUESTIONS = ("Describe the given chest x-ray image in detail.", "What is the most prominent finding?")


@pytest.fixture(scope="module")
def tiny(tiny_llava):
    """The session's tiny llava model (tests that change it write their own files beside it)."""
    return tiny_llava


@pytest.fixture(scope="module")
def pixels(tiny, samples_dir):
    family = LlavaTrainable.from_config(load_config(tiny.config), TrainConfig())
    transform = family.image_transform(augment=False)
    return torch.stack([transform(load_radiograph(samples_dir / name).image) for name in IMAGES])


def _reference_loss(tiny, pixels: torch.Tensor) -> torch.Tensor:
    """The same objective from the reference modules: open_clip trunk hook, projector file, LlamaForCausalLM."""
    tokenizer = AutoTokenizer.from_pretrained(tiny.llm_dir)
    captured = []
    hook = tiny.reference_clip.visual.trunk.blocks[-2].register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        tiny.reference_clip.encode_image(pixels)
    hook.remove()
    weights = load_file(str(tiny.projector))
    hidden = F.gelu(captured[0][:, 1:] @ weights["mm_projector.0.weight"].T + weights["mm_projector.0.bias"])
    image_embeds = hidden @ weights["mm_projector.2.weight"].T + weights["mm_projector.2.bias"]
    losses, counts = [], []
    for image, question, target in zip(image_embeds, QUESTIONS, TARGETS, strict=True):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}],
                                               tokenize=False, add_generation_prompt=True)
        before, after = prompt.split("<image>")
        ids_before = [tokenizer.bos_token_id] + tokenizer(before, add_special_tokens=False).input_ids
        ids_after = tokenizer(after, add_special_tokens=False).input_ids
        ids_target = tokenizer(target + "</s>", add_special_tokens=False).input_ids
        assert ids_target[-1] == tokenizer.eos_token_id  # the model learns to end its turn
        embed = tiny.llm.get_input_embeddings()
        inputs = torch.cat([embed(torch.tensor(ids_before)), image, embed(torch.tensor(ids_after + ids_target))])
        with torch.no_grad():
            logits = tiny.llm(inputs_embeds=inputs[None]).logits[0]
        n = len(ids_target)
        losses.append(F.cross_entropy(logits[-n - 1:-1], torch.tensor(ids_target), reduction="sum"))
        counts.append(n)
    return sum(losses) / sum(counts)


def test_loss_equals_the_reference_computation(tiny, pixels) -> None:
    family = LlavaTrainable.from_config(load_config(tiny.config), TrainConfig())
    family.eval()
    with torch.no_grad():
        loss, tokens = family(pixels, list(QUESTIONS), list(TARGETS))
    expected = _reference_loss(tiny, pixels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert set(family.named_trainable()) == {"mm_projector.0.weight", "mm_projector.0.bias",
                                             "mm_projector.2.weight", "mm_projector.2.bias"}  # stage 1
    assert not any(p.requires_grad for p in [*family.tower.parameters(), *family.llm.parameters()])


def test_stage1_steps_lower_the_loss_and_the_checkpoint_serves(tiny, pixels, tmp_path, samples_dir) -> None:
    family = LlavaTrainable.from_config(load_config(tiny.config), TrainConfig())
    family.train()
    optimizer = torch.optim.AdamW(family.named_trainable().values(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss, _ = family(pixels, list(QUESTIONS), list(TARGETS))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    checkpoint = tmp_path / "checkpoint_0.pth"
    torch.save({"model": family.checkpoint_state(), "optimizer": optimizer.state_dict(), "epoch": 0}, checkpoint)
    raw = yaml.safe_load(tiny.config.read_text())
    raw["weights"]["projector"] = str(checkpoint)
    served_config = tiny.root / "served.yaml"
    served_config.write_text(yaml.safe_dump(raw))
    served = Assistant.from_config(served_config)
    for name, param in family.projector.named_parameters():
        torch.testing.assert_close(dict(served.model.projector.named_parameters())[name], param)
    session = served.chat(load_radiograph(samples_dir / IMAGES[0]).image)
    assert session.ask(QUESTIONS[0], do_sample=False, max_new_tokens=8).token_ids
    assert session.ask(QUESTIONS[1], do_sample=False, max_new_tokens=8).timings["reused_tokens"] > 196


def test_stage2_trains_lora_and_the_projector(tiny, pixels) -> None:
    settings = TrainConfig()
    settings.lora.enabled = True
    family = LlavaTrainable.from_config(load_config(tiny.config), settings)
    names = set(family.named_trainable())
    assert {n for n in names if n.startswith("mm_projector.")}
    assert any("lora_A" in n for n in names)
    family.train()
    loss, _ = family(pixels, list(QUESTIONS), list(TARGETS))
    loss.backward()
    trainable = family.named_trainable()
    assert all(p.grad is not None for p in trainable.values())
    # peft starts lora_B at zero, so on the first step only lora_B and the projector get a gradient
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_A" not in n)
    assert set(family.adapter_state())
    assert all("lora_" in k for k in family.adapter_state())
    with pytest.raises(CheckpointKeyError, match="do not match"):
        family.load_checkpoint_state({"llama_proj.weight": torch.zeros(1)}, family.adapter_state())


def test_stage2_adapter_served_merged_equals_unmerged(tiny, pixels, tmp_path, samples_dir) -> None:
    settings = TrainConfig()
    settings.lora.enabled = True
    family = LlavaTrainable.from_config(load_config(tiny.config), settings)
    with torch.no_grad():  # a trained-looking adapter: peft starts lora_B at zero
        for name, param in family.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    family.save_adapter(tmp_path / "lora_adapter_0")
    family.eval()
    image = load_radiograph(samples_dir / IMAGES[0]).image
    served = Assistant.from_config(tiny.config, overrides=[f"weights.lora={tmp_path / 'lora_adapter_0'}"])
    assert "LoRA lora_adapter_0" in served.describe()
    assert not any("lora" in n for n, _ in served.model.llm.named_parameters())  # merged into the weights
    segments = served.model.render_prompt([], QUESTIONS[0])
    with torch.no_grad():
        encoding = served.model.encode_image(image)
        embeds = torch.cat([served.model.embed_ids(segments.before), encoding.llm_embeds,
                            served.model.embed_ids(segments.after)], dim=1)
        merged_logits = served.model.llm(inputs_embeds=embeds).logits
        peft_logits = family.llm(inputs_embeds=embeds).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-4, rtol=1e-4)
    plain = Assistant.from_config(tiny.config).model.llm(inputs_embeds=embeds).logits
    assert not torch.allclose(plain, merged_logits, atol=1e-3)  # the adapter changes the answers


# --- through the trainer (xraygpt finetune) ------------------------------------------------------------

QUIET = ["train.report_samples=0", "train.val_fraction=0", "train.warmup_steps=0", "train.augment=false"]


@pytest.fixture(scope="module")
def stage1(tiny, samples_dir, tmp_path_factory):
    """Stage 1 through the Trainer: a fresh projector, two report rows, ten epochs at a high learning rate."""
    import traindata

    from xraygpt_app.train.trainer import Trainer

    data = traindata.caption_folder(tmp_path_factory.mktemp("data"), samples_dir, list(traindata.CAPTIONS)[:2])
    out = tmp_path_factory.mktemp("stage1")
    overrides = [*QUIET, "train.max_epoch=10", "train.init_lr=3e-2", "train.min_lr=3e-3", "train.batch_size=2",
                 "weights.projector=[]"]
    result = Trainer.from_config(tiny.config, data=data, overrides=overrides, output=out).fit()
    assert not result.interrupted
    assert result.checkpoint == out / "checkpoint_9.pth"
    return data, out


def test_trainer_stage1_overfits_and_its_checkpoint_serves(stage1, tiny, samples_dir) -> None:
    _, out = stage1
    losses = [r["loss"] for r in metric_records(out)]
    # only the projector learns; the random tiny LLM's own text loss sets the floor
    assert len(losses) == 10
    assert losses[-1] < 0.85 * losses[0]
    saved = torch.load(out / "checkpoint_9.pth", weights_only=True)
    assert set(saved["model"]) == {"mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight",
                                   "mm_projector.2.bias"}
    assert saved["config"]["family"] == "llava"
    served = Assistant.from_config(tiny.config, overrides=[f"weights.projector={out / 'checkpoint_9.pth'}"])
    torch.testing.assert_close(served.model.projector[0].weight, saved["model"]["mm_projector.0.weight"])
    assert f"projector {out.name}/checkpoint_9.pth" in served.describe()
    session = served.chat(load_radiograph(samples_dir / IMAGES[0]).image)
    reuse = [session.ask(q, do_sample=False, max_new_tokens=8) for q in QUESTIONS]
    full = served.chat(load_radiograph(samples_dir / IMAGES[0]).image, reuse_kv=False)
    assert [t.token_ids for t in reuse] == [full.ask(q, do_sample=False, max_new_tokens=8).token_ids for q in QUESTIONS]


def test_cli_stage2_trains_lora_from_the_stage1_projector(stage1, tiny, tmp_path, capsys, samples_dir) -> None:
    import json

    from xraygpt_app.cli import main

    data, out1 = stage1
    out2 = tmp_path / "stage2"
    args = ["finetune", "-c", str(tiny.config), "--data", str(data), "--output", str(out2), "--json",
            "--set", f"weights.projector={out1 / 'checkpoint_9.pth'}", "--set", "train.lora.enabled=true",
            "--set", "train.max_epoch=2", "--set", "train.init_lr=1e-2", *sum((["--set", o] for o in QUIET), [])]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint"] == str(out2 / "checkpoint_1.pth")
    assert (out2 / "lora_adapter_1" / "adapter_config.json").is_file()
    start = torch.load(out1 / "checkpoint_9.pth", weights_only=True)["model"]["mm_projector.2.weight"]
    end = torch.load(out2 / "checkpoint_1.pth", weights_only=True)["model"]["mm_projector.2.weight"]
    assert not torch.allclose(start, end)  # the projector kept training
    served = Assistant.from_config(tiny.config, overrides=[f"weights.projector={out2 / 'checkpoint_1.pth'}",
                                                         f"weights.lora={out2 / 'lora_adapter_1'}"])
    assert "LoRA lora_adapter_1" in served.describe()
    assert served.chat(load_radiograph(samples_dir / IMAGES[1]).image).ask(QUESTIONS[1], max_new_tokens=6).token_ids


def test_stage1_resume_gives_the_uninterrupted_run(tiny, stage1, tmp_path) -> None:
    from xraygpt_app.train.trainer import Trainer

    data, _ = stage1
    overrides = [*QUIET, "train.max_epoch=3", "train.init_lr=1e-2", "weights.projector=[]"]
    whole = Trainer.from_config(tiny.config, data=data, overrides=overrides, output=tmp_path / "whole").fit()
    cut = Trainer.from_config(tiny.config, data=data, overrides=overrides, output=tmp_path / "cut").fit(stop_after=3)
    resumed = Trainer.from_config(tiny.config, data=data, overrides=overrides, output=tmp_path / "cut").fit(
        resume=cut.checkpoint)
    assert whole.iterations_done == resumed.iterations_done == 6
    cut_losses, whole_losses = ([r["loss"] for r in metric_records(tmp_path / run)] for run in ("cut", "whole"))
    assert cut_losses == pytest.approx(whole_losses, rel=1e-6)
    final = [torch.load(tmp_path / run / "checkpoint_2.pth", weights_only=True)["model"] for run in ("whole", "cut")]
    for key, value in final[0].items():
        torch.testing.assert_close(final[1][key], value, rtol=0, atol=1e-7)

"""The llava family on a tiny real-architecture model (``tests/tinyllava.py``), loaded through ``from_config``:
real patch tokens from the timm trunk, LLaVA-1.5's projector, chat-template prompts, stops, and the
shared chat engine (streaming, KV reuse equal to a full recompute, context budget)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml
from helpers import greedy
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer

from xraygpt_app.api import Assistant
from xraygpt_app.checkpoints import CheckpointKeyError
from xraygpt_app.config import load_config
from xraygpt_app.errors import ConfigError, MissingWeightsError
from xraygpt_app.families import Turn
from xraygpt_app.families.llava.model import ChatTemplate
from xraygpt_app.imaging.loader import load_radiograph

QUESTIONS = ("Describe the given chest x-ray image in detail.", "Is there pleural effusion?",
             "Is the heart size normal?", "Any pneumothorax?")
GREEDY = greedy(10)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny(tiny_llava):
    """The session's tiny llava model (tests that change it write their own files beside it)."""
    return tiny_llava


@pytest.fixture(scope="module")
def model(tiny) -> Assistant:
    return Assistant.from_config(tiny.config)


@pytest.fixture(scope="module")
def image(samples_dir: Path) -> Image.Image:
    return load_radiograph(samples_dir / "nih_cxr14_00000001_000_pa_512.png").image


def _config(tiny, tmp_path: Path, **changes):
    """The tiny config with some sections changed, written next to the model (relative paths stay valid)."""
    raw = yaml.safe_load(tiny.config.read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    path = tiny.root / f"changed_{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _trunk_block_outputs(reference, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output of the reference trunk, captured by hooks during its own pooled forward."""
    outputs = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in
             reference.visual.trunk.blocks]
    with torch.no_grad():
        pooled = reference.encode_image(pixels)
    for hook in hooks:
        hook.remove()
    return outputs + [pooled]


# --- the tower: real patch tokens ---------------------------------------------------------------

def test_patch_tokens_are_the_trunks_penultimate_block_without_cls(model, tiny, image) -> None:
    encoding = model.model.encode_image(image)
    reference = tiny.reference_clip
    expected_pixels = image_transform_v2(PreprocessCfg(**reference.visual.preprocess_cfg), is_train=False)(
        image.convert("RGB"))[None]
    torch.testing.assert_close(encoding.pixel_values, expected_pixels)  # open_clip's own preprocessing
    *blocks, pooled = _trunk_block_outputs(reference, expected_pixels)
    assert encoding.patch_tokens.shape == (1, 196, 192)  # ViT-/16 at 224 px: 14 x 14 patches, CLS dropped
    torch.testing.assert_close(encoding.patch_tokens, blocks[-2][:, 1:], atol=1e-5, rtol=1e-5)
    tokens = encoding.patch_tokens[0]
    assert torch.cdist(tokens, tokens).fill_diagonal_(float("inf")).min() > 1e-3  # every patch its own token
    assert not torch.allclose(blocks[-1][:, 1:], blocks[-2][:, 1:])  # the layer matters
    assert pooled.shape[-1] != tokens.shape[-1] or not any(torch.allclose(t, pooled[0]) for t in tokens)
    assert encoding.llm_embeds.shape == (1, 196, 64)


@pytest.mark.parametrize(("layer", "select", "count"), [(-1, "patch", 196), (3, "cls_patch", 197)])
def test_layer_and_cls_selection(tiny, tmp_path, image, layer, select, count) -> None:
    model = Assistant.from_config(_config(tiny, tmp_path, tower__layer=layer, tower__select=select,
                                        tower__text_config=str(tiny.text_dir)))
    encoding = model.model.encode_image(image)
    blocks = _trunk_block_outputs(tiny.reference_clip, encoding.pixel_values)[:-1]
    expected = blocks[layer] if select == "cls_patch" else blocks[layer][:, 1:]
    assert encoding.patch_tokens.shape[1] == count
    torch.testing.assert_close(encoding.patch_tokens, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("key", "value"), [("model__family", "blip2"), ("tower__select", "cls"),
                                            ("projector__type", "mlp3x_gelu")])
def test_bad_family_choices_name_the_key(tiny, tmp_path, key, value) -> None:
    with pytest.raises(ConfigError, match=key.replace("__", ".") + " must be one of"):
        load_config(_config(tiny, tmp_path, **{key: value}))


def test_tower_is_frozen_and_layer_checked(model, tiny, tmp_path) -> None:
    assert not any(p.requires_grad for p in model.model.tower.parameters())
    with pytest.raises(ConfigError, match="tower.layer is 12 but the tower has 12 blocks"):
        Assistant.from_config(_config(tiny, tmp_path, tower__layer=12))


# --- the projector --------------------------------------------------------------------------------

def test_projector_is_llava_mlp2x_gelu_from_its_file(model, tiny, image) -> None:
    encoding = model.model.encode_image(image)
    weights = load_file(str(tiny.projector))
    hidden = torch.nn.functional.gelu(encoding.patch_tokens @ weights["mm_projector.0.weight"].T
                                      + weights["mm_projector.0.bias"])
    expected = hidden @ weights["mm_projector.2.weight"].T + weights["mm_projector.2.bias"]
    torch.testing.assert_close(encoding.llm_embeds, expected, atol=1e-5, rtol=1e-5)


def test_linear_projector_and_mismatched_file(tiny, tmp_path, image) -> None:
    import tinyllava

    linear = tinyllava.write_projector(tiny.root / "linear.safetensors", 192, 64, kind="linear")
    model = Assistant.from_config(_config(tiny, tmp_path, projector__type="linear", weights__projector=linear.name))
    encoding = model.model.encode_image(image)
    weights = load_file(str(linear))
    torch.testing.assert_close(encoding.llm_embeds, encoding.patch_tokens @ weights["mm_projector.weight"].T
                               + weights["mm_projector.bias"], atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointKeyError, match="linear, 192 -> 64"):  # an mlp file for a linear projector
        Assistant.from_config(_config(tiny, tmp_path, projector__type="linear"))


def test_missing_projector_says_how_to_train_one(tiny, tmp_path) -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "eval_configs" / "biomedclip_tinyllama.yaml")
    assert "xraygpt finetune" in config.weights.projector.how_to_get
    path = _config(tiny, tmp_path, weights__projector={"sources": ["nowhere.safetensors"],
                                                      "how_to_get": config.weights.projector.how_to_get})
    with pytest.raises(MissingWeightsError, match="xraygpt finetune"):
        Assistant.from_config(path)


# --- prompts and stops -------------------------------------------------------------------------------

def test_prompt_is_the_tokenizers_chat_template(model, tiny) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny.llm_dir)
    history = [Turn(QUESTIONS[0], "clear lungs")]
    segments = model.model.render_prompt(history, QUESTIONS[1])
    messages = [{"role": "user", "content": f"<image>\n{QUESTIONS[0]}"},
                {"role": "assistant", "content": "clear lungs"}, {"role": "user", "content": QUESTIONS[1]}]
    assert segments.text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert segments.text == (f"<|user|>\n<image>\n{QUESTIONS[0]}</s>\n<|assistant|>\nclear lungs</s>\n"
                             f"<|user|>\n{QUESTIONS[1]}</s>\n<|assistant|>\n")
    assert segments.before == [tokenizer.bos_token_id, *tokenizer("<|user|>\n", add_special_tokens=False).input_ids]
    assert tokenizer.decode(segments.after).strip().endswith("<|assistant|>")
    assert model.model.stop_sequences() == [[tokenizer.eos_token_id]]  # TinyLlama ends a turn with </s>


def test_end_of_turn_spelled_by_pieces_is_a_stop(tiny) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny.llm_dir)
    tokenizer.chat_template = CHATML  # Qwen's format; "<|im_end|>" is not one token of this vocabulary
    template = ChatTemplate(tokenizer, tiny.llm_dir)
    assert template.end_of_turn == "<|im_end|>"
    stops = template.stop_sequences([tokenizer.eos_token_id])
    after_text = tokenizer("ab<|im_end|>", add_special_tokens=False).input_ids[1:]  # as it follows an answer
    assert [tokenizer.eos_token_id] in stops
    assert after_text in stops
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids in stops  # with the word-start piece
    assert all(tokenizer.decode(s).strip() in ("<|im_end|>", tokenizer.eos_token) for s in stops)
    without = AutoTokenizer.from_pretrained(tiny.llm_dir)
    without.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        ChatTemplate(without, tiny.llm_dir)


def test_answer_text_drops_the_end_of_turn(model, tiny) -> None:
    tokenizer = model.model.tokenizer
    ids = tokenizer("clear lungs", add_special_tokens=False).input_ids
    assert model.model.answer_text([*ids, tokenizer.eos_token_id]) == "clear lungs"


# --- the shared chat engine ----------------------------------------------------------------------------

def test_kv_reuse_equals_full_recompute(model, image) -> None:
    reuse, full = model.chat(image, reuse_kv=True), model.chat(image, reuse_kv=False)
    ids = [[reuse.ask(q, **GREEDY).token_ids for q in QUESTIONS], [full.ask(q, **GREEDY).token_ids for q in QUESTIONS]]
    assert ids[0] == ids[1]
    assert [t.prompt for t in reuse.turns] == [t.prompt for t in full.turns]
    assert all(t.timings["reused_tokens"] > 196 for t in reuse.turns[1:])  # the image is never recomputed
    assert all(t.timings["reused_tokens"] == 0 for t in full.turns)
    assert f"<|assistant|>\n{reuse.turns[0].answer}</s>" in reuse.turns[1].prompt  # answers carried on


def test_streaming_and_cancel(model, image) -> None:
    streamed, plain = model.chat(image), model.chat(image)
    pieces = list(streamed.ask_stream(QUESTIONS[0], do_sample=True, seed=3, max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces) == streamed.turns[-1].answer
    assert plain.ask(QUESTIONS[0], do_sample=True, seed=3, max_new_tokens=12).token_ids == streamed.turns[-1].token_ids
    cancel = threading.Event()
    stream = streamed.ask_stream(QUESTIONS[1], cancel=cancel, do_sample=False, max_new_tokens=30)
    next(stream)
    cancel.set()
    list(stream)
    assert streamed.turns[-1].cancelled
    assert len(streamed.turns[-1].token_ids) < 30


def test_old_turns_leave_the_context_first(tiny, tmp_path, image) -> None:
    model = Assistant.from_config(_config(tiny, tmp_path, llm__max_length=290))
    session = model.chat(image)
    turns = [session.ask(q, **GREEDY) for q in QUESTIONS]
    assert turns[0].dropped_turns == 0
    assert turns[-1].dropped_turns > 0
    assert all(t.prompt.count("<image>") == 1 for t in turns)  # the image always stays
    assert all(len(t.prompt_segment_ids[0]) + 196 + len(t.prompt_segment_ids[1]) + 10 <= 290 for t in turns)


def test_model_line_names_family_and_weights(model) -> None:
    line = model.describe()
    assert "LLaVA" in line
    assert "biomedclip_tiny" in line
    assert "projector.safetensors" in line
    assert "llm" in line


# --- check and fetch -----------------------------------------------------------------------------------

def test_memory_estimate_counts_the_tower_and_projector(tiny) -> None:
    from xraygpt_app.memory import estimate

    result = estimate(load_config(tiny.config), assume_cuda=False)
    parts = result.breakdown["cpu"]
    trunk = tiny.reference_clip.visual.trunk
    assert parts["vision"] == sum(p.numel() for p in trunk.parameters()) * 4  # float32 on the CPU
    assert parts["qformer"] == (192 * 64 + 64 + 64 * 64 + 64) * 4  # the projector sits in that column
    llm_tensors = [*tiny.llm.parameters(), *tiny.llm.buffers()]  # buffers: the rotary inv_freq
    assert parts["llm_weights"] == sum(t.numel() * 4 for t in llm_tensors)
    real = estimate(load_config(Path(__file__).resolve().parents[1] / "eval_configs" / "biomedclip_tinyllama.yaml"),
                    assume_cuda=True)
    assert any("TinyLlama-1.1B" in note for note in real.notes)
    assert any("ViT-B/16" in note for note in real.notes)
    assert 1.5 * 2**30 < result_peak_gpu(real) < 4 * 2**30  # fp16: about 2.2 GB of weights


def result_peak_gpu(result) -> int:
    return next(size for device, size in result.peak.items() if device.startswith("cuda"))


def test_fetch_names_the_towers_text_config_repo(tiny) -> None:
    from xraygpt_app.families.llava.tower import tower_config_repos

    config = load_config(tiny.config)
    assert tower_config_repos(config) == {}  # tower.text_config is set: nothing to fetch
    config.tower.text_config = None
    assert set(tower_config_repos(config).values()) == {"microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"}


def test_repository_tiny_config_runs_on_the_builders_layout(tmp_path, samples_dir) -> None:
    """eval_configs/llava_tiny.yaml reads what `python tests/tinyllava.py checkpoints/llava_tiny` writes."""
    import shutil

    import tinyllava

    (tmp_path / "eval_configs").mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "eval_configs" / "llava_tiny.yaml", tmp_path / "eval_configs")
    tinyllava.build_llava(tmp_path / "checkpoints" / "llava_tiny")
    model = Assistant.from_config(tmp_path / "eval_configs" / "llava_tiny.yaml")
    image = load_radiograph(samples_dir / "nih_cxr14_00000001_000_pa_512.png").image
    assert model.report(image, do_sample=False).token_ids


def test_cli_ask_on_the_family_names_the_model(tiny, samples_dir, capsys) -> None:
    import json

    from xraygpt_app.cli import main

    image = str(samples_dir / "nih_cxr14_00000001_000_pa_512.png")
    command = ["ask", image, "-c", str(tiny.config), "--greedy", "--json", "-q", QUESTIONS[0], "-q", QUESTIONS[1]]
    assert main(command) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model"].startswith("LLaVA-style")
    assert payload["config"]["model"]["family"] == "llava"
    assert [turn["question"] for turn in payload["turns"]] == list(QUESTIONS[:2])
    assert payload["turns"][1]["timings"]["reused_tokens"] > 196


def test_bench_runs_on_the_tiny_model(capsys, shared_dir) -> None:
    """bench/bench_llava.py end to end on the tiny model (figures are printed, never asserted)."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_llava

    assert bench_llava.main(["--models", "tiny", "--modes", "fp32", "--repeats", "1", "--new-tokens", "2",
                             "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["measured"]["tiny"]
    assert row["prompt_tokens"] > 196
    assert row["followup_prefilled"] < row["prompt_tokens"]


@pytest.mark.parametrize(("mode", "llm_dtype"), [("bf16", torch.bfloat16), ("8bit", torch.float32)])
def test_cpu_precision_modes(tiny, image, mode, llm_dtype) -> None:
    """The same runtime modes as XrayGPT: bf16 everywhere, or an 8-bit LLM (bitsandbytes) with a float32 tower."""
    model = Assistant.from_config(tiny.config, overrides=[f"runtime.mode={mode}"])
    encoding = model.model.encode_image(image)
    assert encoding.llm_embeds.dtype == llm_dtype
    assert model.model.placement.llm_quantization == (
        "8bit" if mode == "8bit" else None)
    assert next(model.model.tower.parameters()).dtype == (torch.bfloat16 if mode == "bf16" else torch.float32)
    session = model.chat(image)
    assert session.ask(QUESTIONS[0], **GREEDY).token_ids
    assert session.ask(QUESTIONS[1], **GREEDY).token_ids
    assert session.turns[1].timings["reused_tokens"] > 196


def test_app_preview_shows_the_towers_own_crop(model, tiny, image, samples_dir) -> None:
    """The upload preview shows the image as open_clip's transform frames it (centre crop), not XrayGPT's resize."""
    from torchvision.transforms.functional import normalize, to_tensor

    from xraygpt_app.web import handlers as h

    view, how = model.input_view(image)
    mean, std = tiny.reference_clip.visual.preprocess_cfg["mean"], tiny.reference_clip.visual.preprocess_cfg["std"]
    pixels = model.model.encode_image(image).pixel_values
    torch.testing.assert_close(normalize(to_tensor(view), mean, std)[None], pixels)
    assert "CenterCrop" in how
    data = (samples_dir / "covidcxr_ARDSSevere_rgb_790x631.png").read_bytes()
    _, preview, _, note = h.load_image(None, data, model.config.image, input_view=model.input_view)
    assert not note
    assert "Model input: Resize(224) then CenterCrop" in preview
    assert "aspect ratio not kept" not in preview

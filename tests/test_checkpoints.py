"""Checkpoint import: tiny real-format files load through the production path and compute what an
independent reference computes from the raw tensors; unknown and missing keys are named errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tinymodels as tm
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from xraygpt_app.api import Assistant
from xraygpt_app.checkpoints import CheckpointKeyError, read_state_dict
from xraygpt_app.errors import ConfigError
from xraygpt_app.families.xraygpt.checkpoints import remap_blip2, remap_eva_vit, remap_xraygpt
from xraygpt_app.families.xraygpt.vision import preprocess


def _load(tiny: tm.TinyModels, *overrides: str) -> Assistant:
    return Assistant.from_config(tiny.config, list(overrides))


@pytest.fixture(scope="module")
def loaded(tiny_xraygpt: tm.TinyModels) -> Assistant:
    return _load(tiny_xraygpt)


@pytest.fixture(scope="module")
def raw(tiny_xraygpt: tm.TinyModels) -> dict:
    return {"eva": torch.load(tiny_xraygpt.eva, weights_only=True),
            "blip2": torch.load(tiny_xraygpt.blip2, weights_only=True)["model"],
            "ckpt": torch.load(tiny_xraygpt.ckpt, weights_only=True)["model"]}


# --- independent references ------------------------------------------------------------------

def reference_eva(sd: dict, pixels: torch.Tensor, heads: int, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """EVA ViT forward written from the LAVIS tensors: pre-norm blocks, qkv bias [q, 0, v], exact GELU."""
    sd = {k: v.float() for k, v in sd.items()}
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    batch, tokens, width = x.shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (width,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.q_bias"]), sd[p + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], bias).reshape(batch, tokens, 3, heads, -1).permute(
            2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + F.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x


def reference_qformer(blip2: dict, dims: tm.TinyDims) -> Blip2QFormerModel:
    """A ``Blip2QFormerModel`` loaded from the LAVIS keys by this test's own name mapping."""
    config = Blip2QFormerConfig(hidden_size=dims.q_hidden, num_hidden_layers=dims.q_layers,
                                num_attention_heads=dims.q_heads, intermediate_size=dims.q_intermediate,
                                layer_norm_eps=1e-12, cross_attention_frequency=dims.cross_attention_freq,
                                encoder_hidden_size=dims.embed_dim)
    state = {}
    for key, value in blip2.items():
        if not key.startswith("Qformer.bert.") or "_embeddings" in key or key.endswith("position_ids"):
            continue
        name = key.removeprefix("Qformer.bert.").replace("embeddings.LayerNorm", "layernorm")
        if re.search(r"layer\.\d+\.(intermediate|output)\.", name):
            continue  # the text branch's FFN
        state[name.replace("attention.self.", "attention.attention.")] = value
    model = Blip2QFormerModel(config)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys
    return model.eval()


# --- the factory writes the fixture's exact layouts -------------------------------------------

FIXTURE_DIMS = tm.TinyDims(image_size=224, embed_dim=64, depth=3, vision_heads=4, q_hidden=32, q_layers=4,
                           q_heads=4, q_intermediate=64, q_queries=8, q_vocab=512, q_positions=64, llm_hidden=64,
                           llm_layers=2, llm_heads=4, t5_width=48)


def _layout(sd: dict) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def test_factory_layouts_equal_fixture_files(xraygpt_fixture_dir: Path) -> None:
    eva = torch.load(xraygpt_fixture_dir / "eva_vit_tiny.pth", weights_only=True)
    blip2 = torch.load(xraygpt_fixture_dir / "blip2_tiny.pth", weights_only=True)
    ckpt = torch.load(xraygpt_fixture_dir / "xraygpt_tiny.pth", weights_only=True)
    assert _layout(tm.eva_state_dict(FIXTURE_DIMS)) == _layout(eva)
    assert set(blip2) == {"model"}
    assert _layout(tm.blip2_state_dict(FIXTURE_DIMS)) == _layout(blip2["model"])
    ours = tm.xraygpt_checkpoint(FIXTURE_DIMS)
    assert set(ours) == set(ckpt) == {"model", "optimizer", "config", "scaler", "epoch"}
    assert _layout(ours["model"]) == _layout(ckpt["model"])


# --- production loading equals the references --------------------------------------------------

def test_vision_tower_equals_handwritten_eva(loaded: Assistant, raw: dict, tiny_xraygpt: tm.TinyModels) -> None:
    dims = tiny_xraygpt.dims
    pixels = torch.randn(2, 3, dims.image_size, dims.image_size, generator=torch.Generator().manual_seed(0))
    expected = reference_eva(raw["eva"], pixels, dims.vision_heads, dims.patch_size)
    expected = F.layer_norm(expected, (dims.embed_dim,), raw["blip2"]["ln_vision.weight"],
                            raw["blip2"]["ln_vision.bias"], 1e-5)
    with torch.inference_mode():
        ours = loaded.model.vision(pixels)
    assert ours.shape == (2, dims.num_patches + 1, dims.embed_dim)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_qformer_equals_independently_mapped_reference(loaded: Assistant, raw: dict,
                                                       tiny_xraygpt: tm.TinyModels) -> None:
    dims = tiny_xraygpt.dims
    image = torch.randn(1, dims.num_patches + 1, dims.embed_dim, generator=torch.Generator().manual_seed(1))
    reference = reference_qformer(raw["blip2"], dims)
    with torch.inference_mode():
        expected = reference(query_embeds=raw["blip2"]["query_tokens"], encoder_hidden_states=image).last_hidden_state
        hidden, projected = loaded.model.bridge(image)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(projected, F.linear(expected, raw["ckpt"]["llama_proj.weight"],
                                                   raw["ckpt"]["llama_proj.bias"]), atol=1e-5, rtol=1e-5)


def test_parameters_are_the_file_tensors(loaded: Assistant, raw: dict) -> None:
    """Spot checks by name: EVA q/v bias, a cross-attention key (width = vision), ln_vision, queries."""
    eva, bridge = loaded.model.vision.eva, loaded.model.bridge
    torch.testing.assert_close(eva.blocks[1].attn.v_bias, raw["eva"]["blocks.1.attn.v_bias"].float())
    assert torch.count_nonzero(eva.blocks[0].attn.k_bias) == 0
    key = bridge.qformer.encoder.layer[0].crossattention.attention.key.weight
    torch.testing.assert_close(key, raw["blip2"]["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    torch.testing.assert_close(loaded.model.vision.ln_vision.bias, raw["blip2"]["ln_vision.bias"])
    torch.testing.assert_close(bridge.query_tokens, raw["blip2"]["query_tokens"])


def test_encode_image_equals_reference_pipeline(loaded: Assistant, raw: dict, tiny_xraygpt: tm.TinyModels) -> None:
    dims = tiny_xraygpt.dims
    image = Image.linear_gradient("L").resize((90, 70))
    encoding = loaded.model.encode_image(image)
    pixels = preprocess(image, loaded.config.vision)
    vit = F.layer_norm(reference_eva(raw["eva"], pixels, dims.vision_heads, dims.patch_size), (dims.embed_dim,),
                       raw["blip2"]["ln_vision.weight"], raw["blip2"]["ln_vision.bias"], 1e-5)
    with torch.inference_mode():
        hidden = reference_qformer(raw["blip2"], dims)(query_embeds=raw["blip2"]["query_tokens"],
                                                       encoder_hidden_states=vit).last_hidden_state
    expected = F.linear(hidden, raw["ckpt"]["llama_proj.weight"], raw["ckpt"]["llama_proj.bias"])
    torch.testing.assert_close(encoding.llm_embeds, expected, atol=1e-5, rtol=1e-5)


# --- unknown, missing and overriding keys -------------------------------------------------------

def _edited(path: Path, target: Path, container: bool, add: dict | None = None, drop: tuple = ()) -> Path:
    data = torch.load(path, weights_only=True)
    sd = data["model"] if container else data
    for key in drop:
        del sd[key]
    sd.update(add or {})
    torch.save(data, target)
    return target


def _native_file(tiny: tm.TinyModels, which: str) -> Path:
    """The tiny model's file for a weights entry, in its native format."""
    return {"eva_vit_g": tiny.eva, "blip2_qformer": tiny.blip2, "ckpt": tiny.ckpt}[which]


@pytest.mark.parametrize("which, container, key", [
    ("eva_vit_g", False, "blocks.0.attn.relative_position_bias_table"),
    ("eva_vit_g", False, "norm.weight"),
    ("blip2_qformer", True, "Qformer.bert.encoder.layer.0.attention.self.distance_embedding.weight"),
    ("blip2_qformer", True, "vision_proj_extra.weight"),
    ("ckpt", True, "llama_model.model.embed_tokens.weight"),
    ("ckpt", True, "mystery_head.bias"),
])
def test_unknown_key_is_named(tiny_xraygpt: tm.TinyModels, tmp_path: Path, which: str, container: bool,
                              key: str) -> None:
    source = _native_file(tiny_xraygpt, which)
    edited = _edited(source, tmp_path / source.name, container, add={key: torch.zeros(4)})
    with pytest.raises(CheckpointKeyError, match=re.escape(key)):
        _load(tiny_xraygpt, f"weights.{which}={edited}")


@pytest.mark.parametrize("which, container, key", [
    ("eva_vit_g", False, "blocks.1.mlp.fc2.bias"),
    ("blip2_qformer", True, "query_tokens"),
    ("blip2_qformer", True, "Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight"),
    ("blip2_qformer", True, "ln_vision.weight"),
    ("ckpt", True, "llama_proj.bias"),
])
def test_missing_key_raises(tiny_xraygpt: tm.TinyModels, tmp_path: Path, which: str, container: bool,
                            key: str) -> None:
    source = _native_file(tiny_xraygpt, which)
    edited = _edited(source, tmp_path / source.name, container, drop=(key,))
    with pytest.raises(CheckpointKeyError, match="missing"):
        _load(tiny_xraygpt, f"weights.{which}={edited}")


def test_xraygpt_checkpoint_overrides_blip2_and_eva(tiny_xraygpt: tm.TinyModels, tmp_path: Path) -> None:
    dims, g = tiny_xraygpt.dims, torch.Generator().manual_seed(5)
    extra = {"query_tokens": torch.randn(1, dims.q_queries, dims.q_hidden, generator=g),
             "Qformer.bert.encoder.layer.0.output_query.dense.bias": torch.randn(dims.q_hidden, generator=g),
             "ln_vision.weight": torch.randn(dims.embed_dim, generator=g),
             "visual_encoder.blocks.0.attn.q_bias": torch.randn(dims.embed_dim, generator=g).half()}
    ckpt = tmp_path / "ckpt_override.pth"
    torch.save(tm.xraygpt_checkpoint(dims, extra=extra), ckpt)
    model = _load(tiny_xraygpt, f"weights.ckpt={ckpt}").model
    torch.testing.assert_close(model.bridge.query_tokens, extra["query_tokens"])
    torch.testing.assert_close(model.bridge.qformer.encoder.layer[0].output_query.dense.bias,
                               extra["Qformer.bert.encoder.layer.0.output_query.dense.bias"])
    torch.testing.assert_close(model.vision.ln_vision.weight, extra["ln_vision.weight"])
    torch.testing.assert_close(model.vision.eva.blocks[0].attn.q_bias,
                               extra["visual_encoder.blocks.0.attn.q_bias"].float())


def test_checkpoint_rotary_buffer_must_match_llm(tiny_xraygpt: tm.TinyModels, tmp_path: Path) -> None:
    key = "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq"
    wrong = {key: tm.rotary_inv_freq(tiny_xraygpt.dims, base=500000.0)}
    ckpt = tmp_path / "ckpt_rope.pth"
    torch.save(tm.xraygpt_checkpoint(tiny_xraygpt.dims, extra=wrong), ckpt)
    with pytest.raises(CheckpointKeyError, match=re.escape(key)):
        _load(tiny_xraygpt, f"weights.ckpt={ckpt}")


def test_blip2_file_without_model_container(tiny_xraygpt: tm.TinyModels, tmp_path: Path) -> None:
    flat = tmp_path / "flat.pth"
    torch.save(torch.load(tiny_xraygpt.blip2, weights_only=True)["model"], flat)
    with pytest.raises(CheckpointKeyError, match="model"):
        read_state_dict(flat, container_key="model")


def test_remaps_are_pure(raw: dict) -> None:
    """The remap functions never mutate their input."""
    for fn, sd in ((remap_eva_vit, raw["eva"]), (remap_blip2, raw["blip2"]), (remap_xraygpt, raw["ckpt"])):
        before = dict(sd)
        fn(sd)
        assert list(sd) == list(before)
        assert all(sd[k] is before[k] for k in sd)


# --- the LLM folder -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-inv-freq"])
def test_llm_folder_formats_load(tiny_xraygpt: tm.TinyModels, tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / f"vicuna_{fmt}"
    if fmt == "safetensors":
        tm.save_llama_safetensors(tiny_xraygpt.llm, folder)
        assert (folder / "model.safetensors").is_file()
    else:
        tm.save_llama_sharded_bin(tiny_xraygpt.llm, folder, shards=8, inv_freq=fmt == "bin-inv-freq")
        assert len(list(folder.glob("pytorch_model-*-of-00008.bin"))) == 8
    model = _load(tiny_xraygpt, f"weights.llama_model={folder}").model
    ids = torch.tensor([[1, 17, 400, 999, 5, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(model.llm(ids).logits, tiny_xraygpt.llm(ids).logits, atol=1e-5, rtol=1e-5)
    assert model.tokenizer.pad_token == model.tokenizer.eos_token


def test_llm_hidden_size_mismatch_with_folder(tiny_xraygpt: tm.TinyModels, tmp_path: Path) -> None:
    """Config and checkpoint agree (128) but the folder's LLM is 64 wide."""
    dims = tm.with_dims(llm_hidden=128)
    ckpt = tmp_path / "ckpt128.pth"
    torch.save(tm.xraygpt_checkpoint(dims), ckpt)
    with pytest.raises(ConfigError, match=r"llm\.hidden_size"):
        _load(tiny_xraygpt, "llm.hidden_size=128", f"weights.ckpt={ckpt}")


def test_llm_hidden_size_mismatch_with_config_only(tiny_xraygpt: tm.TinyModels) -> None:
    """Only the config is wrong: the user must be told to fix llm.hidden_size, not see a size-mismatch trace."""
    with pytest.raises(ConfigError, match=r"llm\.hidden_size"):
        _load(tiny_xraygpt, "llm.hidden_size=128")


@pytest.mark.parametrize("drop, extra, expected", [
    (("model.layers.1.mlp.down_proj.weight",), None, "model.layers.1.mlp.down_proj.weight"),
    ((), {"model.layers.0.self_attn.mystery.weight": torch.zeros(2)}, "model.layers.0.self_attn.mystery.weight"),
])
def test_llm_folder_missing_or_unknown_key(tiny_xraygpt: tm.TinyModels, tmp_path: Path, drop: tuple,
                                          extra: dict | None, expected: str) -> None:
    folder = tm.save_llama_sharded_bin(tiny_xraygpt.llm, tmp_path / "vicuna_bad", shards=3, drop=drop, extra=extra)
    with pytest.raises(CheckpointKeyError, match=re.escape(expected)):
        _load(tiny_xraygpt, f"weights.llama_model={folder}")

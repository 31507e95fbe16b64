"""Typed YAML config: unknown keys and wrong types are named errors; --set overrides; paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from xraygpt_app.config import Config, load_config
from xraygpt_app.errors import ConfigError
from xraygpt_app.yamlconfig import parse_override

EVAL_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "eval_configs").glob("*.yaml"))


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_every_eval_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.source == str(path)


def test_eval_configs_exist() -> None:
    names = {p.name for p in EVAL_CONFIGS}
    assert {"xraygpt_eval.yaml", "tiny_fixture.yaml"} <= names


def test_defaults_are_real_xraygpt_dims(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, {}))
    assert (config.vision.embed_dim, config.vision.depth, config.vision.num_heads) == (1408, 39, 16)
    assert (config.qformer.hidden_size, config.qformer.num_query_tokens) == (768, 32)
    assert config.llm.hidden_size == 4096 and config.llm.max_length == 2000
    gen = config.generation
    assert (gen.max_new_tokens, gen.num_beams, gen.do_sample, gen.top_p, gen.temperature) == (300, 1, True, 0.9, 1.0)


@pytest.mark.parametrize("data, key", [
    ({"visoin": {"depth": 3}}, "visoin"),
    ({"vision": {"dpeth": 3}}, "vision.dpeth"),
    ({"weights": {"ckpt": {"sources": ["a.pth"], "sha265": "00"}}}, "weights.ckpt.sha265"),
    ({"generation": {"max_new_token": 5}}, "generation.max_new_token"),
    ({"overrides": ["llm.max_length=9"]}, "overrides"),  # how the config was loaded, never a key of the file
])
def test_unknown_key_names_file_and_key(tmp_path: Path, data: dict, key: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert key in str(info.value)


@pytest.mark.parametrize("data, key", [
    ({"vision": {"depth": "three"}}, "vision.depth"),
    ({"vision": {"depth": 3.5}}, "vision.depth"),
    ({"generation": {"do_sample": "yes please"}}, "generation.do_sample"),
    ({"llm": {"max_length": True}}, "llm.max_length"),
    ({"vision": {"mean": 0.5}}, "vision.mean"),
    ({"vision": 7}, "vision"),
])
def test_wrong_types_are_named(tmp_path: Path, data: dict, key: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("data", [
    {"runtime": {"mode": "int3"}},
    {"vision": {"precision": "fp8"}},
    {"vision": {"embed_dim": 65, "num_heads": 4}},
    {"generation": {"top_p": 0.0}},
    {"generation": {"max_new_tokens": 0}},
])
def test_invalid_values_rejected(tmp_path: Path, data: dict) -> None:
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, data))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_set_overrides_nested_new_and_coerced(tmp_path: Path) -> None:
    path = _write(tmp_path, {"vision": {"depth": 3}, "generation": {"max_new_tokens": 20}})
    config = load_config(path, ["vision.depth=5", "generation.max_new_tokens=50", "generation.top_p=1",
                                "generation.seed=7", "runtime.mode=8bit", "llm.use_fast_tokenizer=true",
                                "vision.ln_vision_eps=1e-6"])
    assert config.vision.depth == 5  # existing value replaced
    assert config.generation.max_new_tokens == 50
    assert config.generation.top_p == 1.0 and isinstance(config.generation.top_p, float)  # int -> float
    assert config.generation.seed == 7  # section absent key, new value
    assert config.runtime.mode == "8bit"  # a section absent from the file
    assert config.llm.use_fast_tokenizer is True
    assert config.vision.ln_vision_eps == pytest.approx(1e-6)


def test_set_override_list_and_null(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, {"generation": {"seed": 3}}),
                         ["generation.seed=null", "vision.mean=[0.5, 0.5, 0.5]"])
    assert config.generation.seed is None
    assert config.vision.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("item, fragment", [
    ("vision.dpeth=3", "vision.dpeth"),
    ("vision.depth=deep", "vision.depth"),
    ("nosuchsection.key=1", "nosuchsection"),
])
def test_bad_set_overrides_are_named(tmp_path: Path, item: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(_write(tmp_path, {}), [item])


@pytest.mark.parametrize("item", ["novalue", "=3", "vision.depth.x=3"])
def test_malformed_set_overrides(tmp_path: Path, item: str) -> None:
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, {"vision": {"depth": 3}}), [item])


def test_parse_override_yaml_values() -> None:
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=hello world") == (["a"], "hello world")
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])


def test_relative_weight_paths_resolve_against_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    path = _write(folder, {"weights": {"ckpt": "../weights/x.pth", "llama_model": ["vicuna", "hf-hub:org/repo"],
                                       "eva_vit_g": str(tmp_path / "abs.pth"),
                                       "blip2_qformer": "https://example.org/blip2.pth"}})
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(path)
    assert config.weights.ckpt.sources == [str((tmp_path / "weights" / "x.pth").resolve())]
    assert config.weights.llama_model.sources == [str((folder / "vicuna").resolve()), "hf-hub:org/repo"]
    assert config.weights.eva_vit_g.sources == [str(tmp_path / "abs.pth")]
    assert config.weights.blip2_qformer.sources == ["https://example.org/blip2.pth"]


def test_tiny_fixture_config_points_at_fixture(xraygpt_fixture_dir: Path) -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "eval_configs" / "tiny_fixture.yaml")
    assert Path(config.weights.ckpt.sources[0]) == (xraygpt_fixture_dir / "xraygpt_tiny.pth").resolve()
    assert Path(config.weights.llama_model.sources[0]) == (xraygpt_fixture_dir / "vicuna_tiny").resolve()


def test_weight_spec_mapping_form(tmp_path: Path) -> None:
    digest = "ab" * 32
    config = load_config(_write(tmp_path, {"weights": {"ckpt": {"sources": ["c.pth"], "sha256": digest,
                                                                 "how_to_get": "ask"}}}))
    assert config.weights.ckpt.sha256 == digest and config.weights.ckpt.how_to_get == "ask"
    assert config.weights.ckpt.sources == [str(tmp_path / "c.pth")]


def test_relative_paths_typed_in_set_mean_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    path = _write(folder, {"weights": {"ckpt": {"sources": ["in_yaml.pth"], "sha256": "ab" * 32}}})
    monkeypatch.chdir(tmp_path)
    config = load_config(path, ["weights.ckpt=runs/x.pth", "weights.lora=runs/adapter",
                                "weights.llama_model=[vicuna, hf-hub:org/repo]", f"weights.ckpt.sha256={'cd' * 32}"])
    assert config.weights.ckpt.sources == [str(tmp_path / "runs" / "x.pth")]
    assert config.weights.ckpt.sha256 == "cd" * 32  # not a path
    assert config.weights.lora == str(tmp_path / "runs" / "adapter")
    assert config.weights.llama_model.sources == [str(tmp_path / "vicuna"), "hf-hub:org/repo"]
    assert load_config(path).weights.ckpt.sources == [str(folder / "in_yaml.pth")]  # the YAML's own: its folder

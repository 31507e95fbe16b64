"""bench/realsize.py: the real-size checkpoint writer, at a reduced scale, through the production loader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import REPO

from xraygpt_app.api import Assistant
from xraygpt_app.config import Config
from xraygpt_app.imaging.loader import load_radiograph

sys.path.insert(0, str(REPO / "bench"))

import realsize  # noqa: E402


def test_scale_one_is_the_real_default_config() -> None:
    """At scale 1 the written dims are XrayGPT's (the config defaults), so only paths and mode are overridden."""
    dims, defaults = realsize.RealDims(1.0).tiny(), Config()
    assert (dims.embed_dim, dims.depth, dims.vision_heads) == (defaults.vision.embed_dim, defaults.vision.depth,
                                                                 defaults.vision.num_heads) == (1408, 39, 16)
    assert int(dims.embed_dim * dims.mlp_ratio) == 6144
    assert (dims.q_hidden, dims.q_layers, dims.q_heads, dims.q_intermediate) == (768, 12, 12, 3072)
    assert (dims.llm_hidden, dims.llm_layers, dims.llm_heads, dims.llm_intermediate) == (4096, 32, 32, 11008)
    assert all(s.startswith(("weights.", "runtime.")) for s in realsize.overrides(Path("/x"), 1.0, "bf16"))
    assert 16e9 < realsize.disk_bytes(dims) < 18e9  # "about 17 GB", said before writing


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_dir) -> Path:
    messages: list[str] = []
    root = realsize.build(tmp_path_factory.mktemp("realsize"), scale=0.05, log=messages.append)
    assert "GB of disk" in messages[0]
    realsize.build(root, scale=0.05, log=messages.append)  # a second call reuses the files
    assert messages[-1].startswith("reusing")
    return root


def test_reduced_scale_loads_and_chats(built: Path) -> None:
    folder = built / "Vicuna_Radiology_fp16"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in folder.glob("*.safetensors")}
    xray = Assistant.from_config(realsize.REAL_CONFIG, realsize.overrides(built, 0.05, "bf16"))
    assert len(xray.model.tokenizer) == xray.model.llm.config.vocab_size == 32000
    assert xray.model.suppressed_ids == []
    image = load_radiograph(REPO / "examples" / "nih_cxr14_00000001_000_pa_512.png").image
    session = xray.chat(image)
    turns = [session.ask(q, do_sample=False, max_new_tokens=4, min_length=4) for q in realsize.QUESTIONS]
    assert [len(t.token_ids) for t in turns] == [4, 4]
    assert turns[1].timings["reused_tokens"] > 0

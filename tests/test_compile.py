"""runtime.compile: a static KV cache and a torch.compile'd decode step give the default path's tokens,
with follow-up KV reuse, regenerate and beams still working."""

from __future__ import annotations

from pathlib import Path

from helpers import GREEDY
from torch._dynamo.utils import counters

from xraygpt_app import kvcache
from xraygpt_app.api import Assistant
from xraygpt_app.imaging.loader import load_radiograph

IMAGE = Path(__file__).resolve().parents[1] / "examples" / "nih_cxr14_00000001_000_pa_512.png"
QUESTIONS = ("Describe the image.", "Any effusion?", "Is the heart size normal?")


def _conversation(xray: Assistant, image) -> tuple[list[list[int]], list[int]]:
    session = xray.chat(image)
    ids = [session.ask(q, **GREEDY).token_ids for q in QUESTIONS]
    list(session.regenerate(do_sample=True, seed=5, max_new_tokens=8))
    ids.append(session.turns[-1].token_ids)
    ids.append(session.ask(QUESTIONS[0], num_beams=2, max_new_tokens=6).token_ids)
    ids.append(session.ask(QUESTIONS[1], **GREEDY).token_ids)
    return ids, [t.timings.get("reused_tokens", 0) for t in session.turns]


def test_compiled_static_cache_gives_the_default_tokens(monkeypatch, shared_dir, tiny_config) -> None:
    # The graph is captured by dynamo and run by AOTAutograd without inductor's C++ build (minutes on 2 cores);
    # bench/bench_decode.py measures inductor itself.
    monkeypatch.setattr(kvcache, "CPU_BACKEND", "aot_eager")
    counters.clear()
    image = load_radiograph(IMAGE).image
    default_ids, default_reused = _conversation(Assistant.from_config(tiny_config), image)
    compiled = Assistant.from_config(tiny_config, ["runtime.compile=true"])
    ids, reused = _conversation(compiled, image)
    assert ids == default_ids
    assert reused == default_reused
    assert reused[1] > 0
    assert reused[2] > 0
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step really went through torch.compile
    first, second = compiled.chat(image), compiled.chat(image)
    assert isinstance(first._kv, kvcache.StaticKV)
    assert first._kv.step is second._kv.step  # compiled once per model

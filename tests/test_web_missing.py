"""What the app shows a newcomer whose weights are not there yet: every missing file, greyed-out
buttons, and commands that repeat the user's own config and --set options."""

from __future__ import annotations

import shlex

from helpers import REPO

from xraygpt_app.config import load_config
from xraygpt_app.web.services import build_services

LLAVA_TINY = REPO / "eval_configs" / "llava_tiny.yaml"


def _components(demo) -> list[dict]:
    return [component.get("props", {}) | {"type": component["type"]} for component in demo.config["components"]]


def test_a_llava_config_without_weights_lists_every_file_and_the_users_own_commands(tmp_path):
    overrides = [f"weights.{name}={tmp_path / ('my ' + name)}" for name in ("vision_tower", "projector", "llama_model")]
    overrides.append(f"weights.lora={tmp_path / 'lora'}")
    said: list[str] = []
    services = build_services(load_config(LLAVA_TINY, overrides), progress=said.append, with_zeroshot=False)

    assert said[0] == "Loading LLaVA-style assistant (vision tower, projector, language model)..."
    assert not any("XrayGPT" in line for line in said)
    assert services.assistant is None
    missing = services.assistant_missing
    assert missing.startswith("3 weights files are missing.")
    for name in ("vision_tower", "projector", "llama_model"):
        assert f"Missing weights for weights.{name}." in missing and str(tmp_path / f"my {name}") in missing

    from xraygpt_app.web.ui import build_app

    props = _components(build_app(services))
    boxes = [p["value"] for p in props if "xr-missing" in (p.get("elem_classes") or [])]
    chat_boxes = [box for box in boxes if "LLaVA-style assistant is not available" in box]
    assert len(chat_boxes) == 2  # Report chat and VQA
    sets = " ".join(f"--set {shlex.quote(item)}" for item in overrides)
    for command in ("fetch", "serve"):
        expected = f"xraygpt {command} --config {LLAVA_TINY} {sets}"
        assert all(expected in box for box in chat_boxes), expected
    # this config names no zero-shot model: nothing to fetch, so no commands there, but where to add one
    zeroshot_box = next(box for box in boxes if "Zero-shot classification is not available" in box)
    assert "names no zero-shot model" in zeroshot_box and "xraygpt fetch" not in zeroshot_box
    asking = {p["elem_id"]: p.get("interactive") for p in props
              if p.get("elem_id") in ("generate-report", "ask", "question", "regenerate", "vqa-ask", "vqa-question")}
    assert asking == dict.fromkeys(asking, False) and len(asking) == 6



def test_the_api_descriptions_name_the_configured_family(tmp_path):
    from xraygpt_app.web import handlers as h
    from xraygpt_app.web import tools

    config = load_config(LLAVA_TINY, [f"weights.llama_model={tmp_path / 'absent'}"])
    services = build_services(config, with_assistant=False, with_zeroshot=False)

    def report(): ...
    def ask(): ...
    def classify(): ...

    tools.describe(services, report, ask, classify)
    assert "with LLaVA-style assistant" in report.__doc__ and "with LLaVA-style assistant" in ask.__doc__
    assert "XrayGPT" not in report.__doc__ + ask.__doc__
    assert "LLaVA-style assistant is not loaded" in h._chat_ready(h.UserState(), services)
    state = h.UserState(messages=[{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}])
    assert "**Answer:** a." in h.conversation_markdown(state)  # as the CLI labels turns, for every family

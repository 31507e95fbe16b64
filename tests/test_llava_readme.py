"""The README's llava-family commands run as written: build the tiny model, stage 1, stage 2, ask, serve.

They run in a scratch copy of the layout they expect (``eval_configs/``, ``train_configs/`` and
``tests/`` of this repository, ``../shared`` beside it, ``.venv/bin/python`` and ``.venv/bin/xraygpt``
calling this interpreter), never in the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _app_server import free_port
from test_train_readme import _wait_for_config

REPO = Path(__file__).resolve().parents[1]
SECTION = "## A second model family"


def readme_commands() -> tuple[str, str]:
    """(every line of the section's bash block but the serve command, the serve command)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    before, serve = block.split(".venv/bin/xraygpt serve", 1)
    return before, ".venv/bin/xraygpt serve" + serve


@pytest.fixture
def layout(tmp_path: Path, shared_dir: Path) -> Path:
    (tmp_path / "shared").symlink_to(shared_dir)
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    for name in ("eval_configs", "train_configs"):  # copied: their relative paths point into this layout
        shutil.copytree(REPO / name, repo / name)
    (repo / "tests").symlink_to(REPO / "tests")
    for name, run in (("python", ""), ("xraygpt", " -m xraygpt_app.cli")):
        script = repo / ".venv" / "bin" / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}"{run} "$@"\n', encoding="utf-8")
        script.chmod(0o755)
    return repo


def test_readme_llava_commands_run_as_written(layout: Path) -> None:
    commands, serve = readme_commands()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-e", "-c", commands], cwd=layout, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (layout / "output" / "llava_tiny_stage1" / "checkpoint_1.pth").is_file()
    assert (layout / "output" / "llava_tiny_stage2" / "lora_adapter_1" / "adapter_config.json").is_file()
    assert "model: LLaVA-style" in done.stderr and done.stdout.count("Patient: ") == 2
    port = free_port()
    server = subprocess.Popen(["bash", "-c", "exec " + serve], cwd=layout, env={**env, "GRADIO_SERVER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        config = json.loads(_wait_for_config(f"http://127.0.0.1:{port}/config", server))
        lines = [c["props"]["value"].replace("\\_", "_") for c in config["components"]
                 if "**Model:**" in str(c.get("props", {}).get("value"))]
        assert len(lines) == 1 and "projector checkpoint_1.pth" in lines[0] and "LoRA lora_adapter_1" in lines[0]
    finally:
        server.terminate()
        server.wait(timeout=30)

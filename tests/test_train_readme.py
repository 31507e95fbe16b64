"""The README's "Fine-tuning" commands run as written: a data folder, two runs, --loss-only, and serve.

They run in a scratch copy of the layout they expect (``eval_configs/`` of this repository,
``../shared`` beside it, ``.venv/bin/xraygpt`` calling this interpreter), never in the repository.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> tuple[str, str]:
    """(every line of the section's first bash block but the serve command, the serve command)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Fine-tuning", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    before, serve = block.split(".venv/bin/xraygpt serve", 1)
    return before, ".venv/bin/xraygpt serve" + serve


@pytest.fixture
def layout(tmp_path: Path, shared_dir: Path) -> Path:
    (tmp_path / "shared").symlink_to(shared_dir)
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / "eval_configs").symlink_to(REPO / "eval_configs")
    script = repo / ".venv" / "bin" / "xraygpt"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m xraygpt_app.cli "$@"\n', encoding="utf-8")
    script.chmod(0o755)
    return repo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_finetune_commands_run_as_written(layout: Path) -> None:
    commands, serve = readme_commands()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-e", "-c", commands], cwd=layout, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (layout / "runs" / "tiny" / "checkpoint_1.pth").is_file()
    report = json.loads((layout / "runs" / "tiny" / "report_metrics.json").read_text(encoding="utf-8"))
    assert set(report["overall"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL"} and len(report["reports"]) == 1
    assert (layout / "runs" / "tiny" / "loss_curve.png").is_file()
    assert (layout / "runs" / "tiny_lora" / "lora_adapter_1" / "adapter_config.json").is_file()
    loss_only = json.loads(done.stdout[done.stdout.rindex('{\n  "batches"'):])
    assert len(loss_only["batches"]) == 2 and loss_only["rows"] == 4
    port = free_port()
    server = subprocess.Popen(["bash", "-c", "exec " + serve], cwd=layout, env={**env, "GRADIO_SERVER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        config = json.loads(_wait_for_config(f"http://127.0.0.1:{port}/config", server))
        lines = [c["props"]["value"].replace("\\_", "_") for c in config["components"]
                 if "**Model:**" in str(c.get("props", {}).get("value"))]
        assert len(lines) == 1 and "checkpoint tiny_lora/checkpoint_1.pth" in lines[0]
        assert "LoRA lora_adapter_1" in lines[0]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_config(url: str, server: subprocess.Popen) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode("utf-8")
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the app did not start")

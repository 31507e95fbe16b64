"""Run a documentation section's bash block as written in a scratch layout, and read the served app's model line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _app_server import free_port
from helpers import REPO


def readme_commands(page: str, section: str) -> tuple[str, str]:
    """(every line of the section's first bash block but the serve command, the serve command).

    ``page`` is a Markdown file of the repository (``docs/fine-tuning.md``), ``section`` its ``## `` heading.
    """
    text = (REPO / page).read_text(encoding="utf-8")
    assert f"\n{section}\n" in text, f"{page} has no section {section!r}"
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    before, serve = block.split(".venv/bin/xraygpt serve", 1)
    return before, ".venv/bin/xraygpt serve" + serve


def venv_scripts(repo: Path) -> None:
    """``.venv/bin/python`` and ``.venv/bin/xraygpt`` calling this interpreter (with this repository's package)."""
    (repo / ".venv" / "bin").mkdir(parents=True)
    for name, run in (("python", ""), ("xraygpt", " -m xraygpt_app.cli")):
        script = repo / ".venv" / "bin" / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}"{run} "$@"\n', encoding="utf-8")
        script.chmod(0o755)


def run_readme_section(page: str, section: str, cwd: Path,
                       timeout: int) -> tuple[subprocess.CompletedProcess, str, dict]:
    """Run a page section's commands (all but its serve line) in ``cwd``; the run, the serve line, the env."""
    commands, serve = readme_commands(page, section)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "-e", "-c", commands], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done, serve, env


def served_model_line(serve: str, cwd: Path, env: dict[str, str]) -> str:
    """Start the page's serve command, return the app's "Model:" line, stop it."""
    port = free_port()
    server = subprocess.Popen(["bash", "-c", "exec " + serve], cwd=cwd, env={**env, "GRADIO_SERVER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        config = json.loads(_wait_for_config(f"http://127.0.0.1:{port}/config", server))
        lines = [c["props"]["value"].replace("\\_", "_") for c in config["components"]
                 if "**Model:**" in str(c.get("props", {}).get("value"))]
        assert len(lines) == 1, lines
        return lines[0]
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

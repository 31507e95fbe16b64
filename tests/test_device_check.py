"""bench/device_check.sh --dry-run: every step of the GPU check runs on the CPU with mid-size dims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_dry_run_writes_the_report(tmp_path: Path, shared_dir: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["environment"]["dry_run"] is True
    for name, row in report["modes"].items():
        assert "failed" not in row, name
        if "skipped" in row:
            assert row["skipped"] == "no bitsandbytes"
            continue
        assert len(row["ttft_reuse_s"]) == len(row["ttft_full_s"]) == 8
        assert row["identical_greedy_reuse_vs_full"]
        assert row["prefilled_reuse"][-1] < row["prompt_tokens"][-1]  # the follow-up reused the cache
        assert 0 < row["decode_vs_bound"] and 0 < row["peak_bytes"] and 0 < row["estimate_bytes"]
    assert report["agreement"]["tokens"] > 0 and report["medclip"]["images"] == 20
    vllm = report["vllm"]  # served from .venv-vllm when it exists (tests/test_vllm.py runs it in CI's vLLM leg)
    assert vllm.get("skipped") == "no vllm" or vllm["decode_8_users_tokens_per_s"] > 0, vllm
    markdown = (tmp_path / "device_check.md").read_text()
    assert "DRY RUN" in markdown and markdown.count("\n| ") == 2 + len(report["modes"])

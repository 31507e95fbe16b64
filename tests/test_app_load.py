"""The load bench with three users at once: no cross-talk, and every idle session released."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")
pytestmark = pytest.mark.timeout(600)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_app_load  # noqa: E402


def test_three_users_at_once_get_their_own_answers(samples_dir, tmp_path):
    args = bench_app_load.parse_args(["--users", "3", "--sessions", "4", "--idle-seconds", "6",
                                          "--heartbeat", "1"])
    result = bench_app_load.bench(args, tmp_path)
    assert result["errors"] == []
    assert result["distinct_conversations"] == 3  # three samples, three different conversations...
    assert result["same_as_alone"] == 3  # ...and each user got exactly the answers it gets alone
    assert [row["request"] for row in result["latency"]] == ["upload", "report", "ask", "all"]
    assert result["latency"][-1]["n"] == 3 * 4  # upload, report and two follow-ups per user
    # 3 users alone, 3 at once, 4 in a row: the idle sweep let go of every session's image and KV cache
    assert result["sessions_opened"] == 10 and result["released_total"] == 10
    # each client closed (its heartbeat stopped) before the idle limit: released anyway, not an hour later
    assert result["closed_total"] == 10

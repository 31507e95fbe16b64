"""Without chromium (a non-root user running the test command) the browser tests skip, all of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
TESTS = Path(__file__).resolve().parent


def test_the_upload_cache_check_skips_with_the_browser_tests(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "CI"}  # CI=true makes a missing browser fail
    env["XRAYGPT_TEST_CHROMIUM"] = str(tmp_path / "no-chromium-here")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_app_browser.py"),
               "-k", "no_uploaded_bytes or missing_weights", "-rs"]
    done = subprocess.run(command, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 skipped" in done.stdout and "failed" not in done.stdout and "error" not in done.stdout.lower()
    assert "chromium is not installed" in done.stdout

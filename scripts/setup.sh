#!/usr/bin/env bash
# Creates .venv with the app, its test tools and the browser the tests drive. Idempotent.
# With --vllm: creates .venv-vllm, the vLLM server's environment, instead (scripts/setup-vllm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--vllm" ]; then
  # The vLLM server's own environment (.venv-vllm), for runtime.llm_backend: vllm; see docs/deployment-vllm.md.
  exec bash scripts/setup-vllm.sh
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements-dev.txt
.venv/bin/pip install -q --no-deps -e .
# The browser test drives Debian's chromium (Playwright cannot download its own browsers here).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi

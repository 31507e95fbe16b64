#!/usr/bin/env bash
# The test command: the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q "$@"

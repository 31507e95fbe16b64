#!/usr/bin/env bash
# One prepared check of the real-size model on a bare CUDA machine without internet.
#
#   bash bench/device_check.sh [--dry-run] [--quick] [--wheels DIR] OUT_DIR
#
# Needs a Python (python3, or $PYTHON) with torch, torchvision, transformers, timm, accelerate,
# safetensors, sentencepiece, protobuf, pyyaml, pillow and pydicom preinstalled (tested down to torch
# 2.11 / transformers 5.17). Installs this project without dependencies; bitsandbytes only from
# --wheels DIR (a folder of wheels), else the 8-bit, 4-bit and low-resource rows say "skipped: no
# bitsandbytes". Writes random checkpoints of the real sizes (about 17 GB) under OUT_DIR/cache, then
# runs each step in its own process (one failure does not hide the others) and writes
# OUT_DIR/device_check.json and OUT_DIR/device_check.md. --dry-run: the same steps on the CPU with
# mid-size dims (about a minute; nothing is installed). vLLM step: serves the Vicuna folder with vLLM
# (when this Python imports vllm, or from the repo's .venv-vllm, or installed from --wheels DIR into
# OUT_DIR/venv-vllm) and measures decode tokens/s at 1 and 8 users against the bandwidth bound.
# --quick: only fp16 (3 turns), vLLM and 8-bit, to give the key rows within 8 minutes of a short loan.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=()
QUICK=()
WHEELS=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=(--dry-run) ;;
    --quick) QUICK=(--quick) ;;
    --wheels) WHEELS="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) OUT="$1" ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  echo "usage: bash bench/device_check.sh [--dry-run] [--quick] [--wheels DIR] OUT_DIR" >&2
  exit 2
fi
mkdir -p "$OUT/logs" "$OUT/rows"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/rows/*.json

if [ ${#DRY[@]} -eq 0 ]; then
  "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$REPO" >"$OUT/logs/install.log" 2>&1 \
    || echo "note: pip could not install the project offline (it needs setuptools>=64 and wheel in that Python;" \
            "see $OUT/logs/install.log); every step runs from the source tree through PYTHONPATH instead"
  if [ -n "$WHEELS" ]; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" bitsandbytes >>"$OUT/logs/install.log" 2>&1 \
      || echo "warning: bitsandbytes did not install from $WHEELS"
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export VLLM_CACHE_ROOT="$OUT/cache/vllm"

# The vLLM server's Python: this one if it has vllm, else the repo's .venv-vllm, else one made from --wheels.
VLLM_PY=""
if "$PY" -c "import vllm" >/dev/null 2>&1; then
  VLLM_PY="$(command -v "$PY")"
elif [ -x "$REPO/.venv-vllm/bin/python" ]; then
  VLLM_PY="$REPO/.venv-vllm/bin/python"
elif [ -n "$WHEELS" ] && [ ${#DRY[@]} -eq 0 ] && ls "$WHEELS"/vllm-*.whl >/dev/null 2>&1; then
  "$PY" -m venv "$OUT/venv-vllm" && "$OUT/venv-vllm/bin/pip" install --no-index --find-links "$WHEELS" vllm \
    >>"$OUT/logs/install.log" 2>&1 && VLLM_PY="$OUT/venv-vllm/bin/python" \
    || echo "warning: vllm did not install from $WHEELS (see $OUT/logs/install.log)"
fi

step() {  # step NAME TIMEOUT_S ARGS...: one process, its output in logs/NAME.log
  local name="$1" limit="$2"
  shift 2
  local started=$SECONDS
  timeout "$limit" "$PY" "$REPO/bench/device_check.py" "$@" --out "$OUT" "${DRY[@]}" "${QUICK[@]}" \
    >"$OUT/logs/$name.log" 2>&1
  local code=$?
  [ $code -eq 124 ] && echo "timed out after $limit s" >>"$OUT/logs/$name.log"
  echo "$name: exit $code, $((SECONDS - started)) s"
}

if [ ${#QUICK[@]} -eq 0 ]; then
  step agreement 300 agreement
  step medclip 300 medclip
fi
step build 1200 build
modes=($("$PY" "$REPO/bench/device_check.py" modes "${QUICK[@]}"))
step "${modes[0]}" 900 mode "${modes[0]}"
step vllm 900 vllm --vllm-python "$VLLM_PY"
for mode in "${modes[@]:1}"; do
  step "$mode" 900 mode "$mode"
done
"$PY" "$REPO/bench/device_check.py" report --out "$OUT" "${DRY[@]}" "${QUICK[@]}"

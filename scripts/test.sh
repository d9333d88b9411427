#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite: the core on CPU, and the host
# tests against a real ComfyUI when COMFYUI_PATH points at one (they skip, saying why, otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q -rs "$@"

#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job on the embedded default: a grid of
# generated digits in out/digits.png, with timings and quality printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHONPATH=. .venv/bin/python -m fastgen_core.demo "$@"

#!/usr/bin/env bash
# Create .venv (if missing) and install megatune into it. Sourced by quickstart.sh and test.sh.
# Without a GPU we pin torch 2.13.0 (CPU build where available); with one, pyproject's open range applies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
torch_pin=()
command -v nvidia-smi >/dev/null 2>&1 || torch_pin=("torch==2.13.0")
.venv/bin/python -m pip install -q "${torch_pin[@]}" -e ".${1:-}"

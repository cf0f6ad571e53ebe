#!/usr/bin/env bash
# Install megatune with its test extras into .venv and run the whole test suite (CPU, gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "[test]"
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# The quick start: install megatune, make a tiny Qwen3-style model offline, load it into
# Megatron-core with tensor parallelism over 2 CPU processes, check its logits against
# transformers, and export it back to a Hugging Face checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
out=quickstart
.venv/bin/megatune env
.venv/bin/megatune tiny-model --model_type qwen3 --output_dir $out/tiny-qwen3
.venv/bin/megatune verify --model_name_or_path $out/tiny-qwen3 \
  --tensor_model_parallel_size 2 --nproc_per_node 2 --export_path $out/exported
echo "Hugging Face checkpoint exported to $out/exported:"
ls $out/exported

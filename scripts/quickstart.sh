#!/usr/bin/env bash
# The quick start: install megatune, make a tiny Qwen3-style model and tokenizer offline (random
# weights), fine-tune it (full-parameter SFT) on megatune's bundled demo data on CPU with tensor
# parallelism over 2 processes, and end with a Hugging Face checkpoint in quickstart/output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "[plot]"  # matplotlib: the example writes a loss plot (plot_loss: true)
export OMP_NUM_THREADS=1
.venv/bin/megatune env
.venv/bin/megatune tiny-model --model_type qwen3 --output_dir quickstart/tiny-qwen3
.venv/bin/megatune train examples/tiny_qwen3_sft.yaml --nproc_per_node 2 --overwrite_output_dir true
echo "Hugging Face checkpoint in quickstart/output (loss log: quickstart/output/trainer_log.jsonl," \
     "loss plot: quickstart/output/training_loss.png):"
ls quickstart/output

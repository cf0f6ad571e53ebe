#!/usr/bin/env bash
# Issue 13's MoE measurement on one H200: the Qwen3-30B-A3B shape cut to 4 layers (128 experts,
# top-8, random bf16 weights), seq 4096, global batch 8 x 4096 tokens: transformers (amp, bf16)
# and megatune's fast path at micro-batch 1 and 2 in one call, with kernel-time profiles; then
# megatune at micro-batch 4.
#   bash benchmarks/moe_h200.sh OUT_DIR
set -u
out=${1:-/tmp/moe_speed}; shift || true
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
b="python3 benchmarks/throughput.py --shape qwen3-30b-a3b-4l --seq_len 4096 --steps 4 --warmup 3 --out $out/throughput.jsonl"
$b --micro_batch 1 --grad_accum 8 --paths fast --baseline hf --profile fast
$b --micro_batch 2 --grad_accum 4 --paths fast --baseline hf --profile fast
$b --micro_batch 4 --grad_accum 2 --paths fast
exit 0

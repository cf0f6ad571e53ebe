#!/usr/bin/env bash
# Issue 13's dense measurement on one H200: transformers (amp, bf16) and megatune's plain and fast
# paths on the Qwen3-1.7B shape, seq 4096, global batch 8 x 4096 tokens, in one call.
#   bash benchmarks/speed_h200.sh OUT_DIR
set -u
out=${1:-/tmp/speed}; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
b="python3 benchmarks/throughput.py --shape qwen3-1.7b --seq_len 4096 --steps 4 --warmup 3"
$b --micro_batch 1 --grad_accum 8 --paths --baseline hf --out $out/throughput.jsonl
$b --micro_batch 2 --grad_accum 4 --paths fast --profile fast --out $out/throughput.jsonl
$b --micro_batch 1 --grad_accum 8 --paths fast --profile fast --cprofile fast --out $out/throughput.jsonl 2> $out/cprofile_fast_mb1.txt
$b --micro_batch 4 --grad_accum 2 --paths fast --out $out/throughput.jsonl
$b --micro_batch 1 --grad_accum 8 --paths plain --out $out/throughput.jsonl
exit 0

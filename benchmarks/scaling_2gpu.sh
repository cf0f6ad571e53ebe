#!/usr/bin/env bash
# Issue 13's two-GPU measurements on one host (H200 x2), each beside its 1-GPU baseline in the
# same call; every run is benchmarks/throughput.py's fast path (random weights, synthetic tokens).
#   bash benchmarks/scaling_2gpu.sh OUT_DIR dense [no8b] -- Qwen3-1.7B, seq 4096: 1 GPU vs DP=2 with
#        the overlap options off, on, and on with 400M-parameter buckets (micro-batch 2 x 4 per rank); Qwen3-8B (36 layers) on 2 GPUs,
#        DP=2 with the distributed optimizer and overlap (PP=2 if that fails)
#   bash benchmarks/scaling_2gpu.sh OUT_DIR moe     -- Qwen3-30B-A3B shape, 4 layers: 1 GPU vs DP=2
#        and EP=2 with each token dispatcher (micro-batch 4 x 2 per rank; EP runs profiled), and
#        transformers bf16 at micro-batch 4 on 1 GPU
#   bash benchmarks/scaling_2gpu.sh OUT_DIR overlap -- Qwen3-1.7B, micro-batch 2 x 4: 1 GPU, then DP=2
#        with the overlap options off and on (both profiled), and overlap_grad_reduce alone
#   bash benchmarks/scaling_2gpu.sh OUT_DIR overlap-slow -- the same DP=2 runs (off, both, grad reduce
#        alone) with NCCL kept off NVLink (NCCL_P2P_DISABLE=1: through host shared memory), standing in
#        for a slower link between hosts
#   bash benchmarks/scaling_2gpu.sh OUT_DIR moe-overlap -- Qwen3-30B-A3B shape, 4 layers, micro-batch 4 x 2:
#        1 GPU, then DP=2 with overlap_grad_reduce alone, with neither option, and with both
#   bash benchmarks/scaling_2gpu.sh OUT_DIR vl      -- 1 GPU: Qwen2-VL-7B shape with 8 decoder layers,
#        transformers amp and bf16 vs megatune on the same multimodal batches
#   bash benchmarks/scaling_2gpu.sh OUT_DIR memory  -- 1 GPU: which allocations make the MoE peak
set -u
out=${1:-/tmp/scaling}; what=${2:-dense}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
t="python3 benchmarks/throughput.py --seq_len 4096 --paths fast --out $out/throughput.jsonl"
overlap="overlap_grad_reduce=true overlap_param_gather=true"
case $what in
  dense)
    b="$t --shape qwen3-1.7b --steps 4 --warmup 3 --micro_batch 2 --grad_accum 4"
    CUDA_VISIBLE_DEVICES=0 $b
    $b --gpus 2
    $b --gpus 2 --set $overlap
    $b --gpus 2 --set $overlap ddp_bucket_size=400000000
    [ "${3:-}" = no8b ] && exit 0
    b="$t --shape qwen3-8b --steps 3 --warmup 2 --micro_batch 1 --grad_accum 8 --gpus 2"
    $b --set $overlap || true
    grep -q '"run": "megatune fast", "error"' <(tail -1 $out/throughput.jsonl) && \
      $b --set pipeline_model_parallel_size=2
    ;;
  moe)
    b="$t --shape qwen3-30b-a3b-4l --steps 4 --warmup 3 --micro_batch 4 --grad_accum 2"
    CUDA_VISIBLE_DEVICES=0 $b --baseline hf_bf16
    $b --gpus 2
    $b --gpus 2 --set expert_model_parallel_size=2 --profile fast
    $b --gpus 2 --set expert_model_parallel_size=2 moe_token_dispatcher_type=allgather --profile fast
    ;;
  overlap)
    b="$t --shape qwen3-1.7b --steps 4 --warmup 3 --micro_batch 2 --grad_accum 4"
    CUDA_VISIBLE_DEVICES=0 $b
    $b --gpus 2 --profile fast
    $b --gpus 2 --set $overlap --profile fast
    $b --gpus 2 --set overlap_grad_reduce=true
    ;;
  moe-overlap)
    b="$t --shape qwen3-30b-a3b-4l --steps 4 --warmup 3 --micro_batch 4 --grad_accum 2"
    CUDA_VISIBLE_DEVICES=0 $b
    $b --gpus 2 --set overlap_grad_reduce=true
    $b --gpus 2
    $b --gpus 2 --set $overlap
    ;;
  overlap-slow)
    b="$t --shape qwen3-1.7b --steps 4 --warmup 3 --micro_batch 2 --grad_accum 4 --gpus 2"
    export NCCL_P2P_DISABLE=1
    $b
    $b --set $overlap
    $b --set overlap_grad_reduce=true
    ;;
  vl)
    CUDA_VISIBLE_DEVICES=0 $t --shape qwen2-vl-7b-8l --seq_len 1024 --steps 4 --warmup 2 --micro_batch 4 \
      --grad_accum 2 --baseline hf
    ;;
  memory)
    CUDA_VISIBLE_DEVICES=0 $t --shape qwen3-30b-a3b-4l --steps 1 --warmup 2 --micro_batch 1 --grad_accum 2 --memory_snapshot
    ;;
esac
exit 0

#!/usr/bin/env bash
# MoE training throughput on GPUs: a Qwen3-30B-A3B-shaped model cut to 4 layers (128 experts,
# top-8, random bf16 weights), pt on a synthetic corpus, seq 4096, global batch 8 sequences.
# Baseline in the same call: transformers' own Qwen3-MoE training loop on one GPU, same shape,
# sequence length and batch. Then `megatune train` with expert parallelism on 2 and 4 GPUs, and
# `pp2ep2`: the reference's qwen3_moe_full.yaml layout in small (pipeline + expert parallelism,
# full activation recompute) on 4 GPUs; `pp2`: pipeline parallelism with full recompute on 2.
# From the repository root on a machine with 4 GPUs:
#   bash benchmarks/moe_train_gpu.sh OUT_DIR [baseline] [ep2] [ep4] [pp2] [pp2ep2]   (default: the first three)
set -u
out=${1:-/tmp/moe_gpu}; shift || true
runs=${*:-baseline ep2 ep4}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)/src" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
model=/tmp/qwen3-30b-a3b-4l
if [ ! -f $model/tokenizer.json ]; then
  python3 benchmarks/model_shapes.py --preset qwen3-30b-a3b-4l --output_dir $model --dtype bfloat16
  python3 -c "from megatune.tiny_tokenizer import make_tiny_tokenizer; make_tiny_tokenizer('$model')"
  python3 benchmarks/synthetic_corpus.py --output_dir /tmp/moe_corpus --documents 600 --words 2500
fi
common="--model_name_or_path $model --stage pt --dataset synthetic_corpus --dataset_dir /tmp/moe_corpus
  --cutoff_len 4096 --preprocessing_num_workers 8 --bf16 true --per_device_train_batch_size 1
  --max_steps 12 --learning_rate 1e-4 --warmup_steps 2 --logging_steps 4 --save_steps 1000
  --report_to none --overwrite_output_dir true --moe_grouped_gemm true --moe_token_dispatcher_type alltoall"
for run in $runs; do
  echo "== $run"
  case $run in
    baseline) for precision in bf16 amp; do
                CUDA_VISIBLE_DEVICES=0 python3 benchmarks/hf_train_baseline.py --model_dir $model --seq_len 4096 \
                  --micro_batch 1 --grad_accum 8 --steps 8 --warmup 3 --precision $precision | tee "$out/hf_moe_$precision.json"
              done ;;
    ep2) CUDA_VISIBLE_DEVICES=0,1 python3 -m megatune train $common --nproc_per_node 2 --expert_model_parallel_size 2 \
           --gradient_accumulation_steps 4 --output_dir /tmp/moe_$run ;;
    ep4) python3 -m megatune train $common --nproc_per_node 4 --expert_model_parallel_size 4 \
           --gradient_accumulation_steps 2 --output_dir /tmp/moe_$run ;;
    pp2) CUDA_VISIBLE_DEVICES=0,1 python3 -m megatune train $common --nproc_per_node 2 --pipeline_model_parallel_size 2 \
           --recompute_granularity full --recompute_method uniform --recompute_num_layers 1 \
           --gradient_accumulation_steps 8 --output_dir /tmp/moe_$run ;;
    pp2ep2) python3 -m megatune train $common --nproc_per_node 4 --pipeline_model_parallel_size 2 \
              --expert_model_parallel_size 2 --recompute_granularity full --recompute_method uniform \
              --recompute_num_layers 1 --gradient_accumulation_steps 4 --output_dir /tmp/moe_$run ;;
  esac
  [ -f /tmp/moe_$run/trainer_log.jsonl ] && cp /tmp/moe_$run/trainer_log.jsonl "$out/trainer_log_moe_$run.jsonl"
done
exit 0

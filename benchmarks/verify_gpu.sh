#!/usr/bin/env bash
# Precision check on GPUs: a ~1B model shape with random weights, bf16, 1 GPU then TP=2.
# Run on a machine with 2 GPUs from the repository root:  bash benchmarks/verify_gpu.sh
set -u
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)/src" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python3 -m megatune env
for preset in llama-3.2-1b qwen3-1.7b; do
  dir=/tmp/$preset
  python3 benchmarks/model_shapes.py --preset $preset --output_dir $dir --dtype bfloat16
  echo "== $preset, 1 GPU, bf16"
  CUDA_VISIBLE_DEVICES=0 python3 -m megatune verify --model_name_or_path $dir --bf16 true
  echo "== $preset, 2 GPUs, TP=2, bf16"
  python3 -m megatune verify --model_name_or_path $dir --bf16 true --tensor_model_parallel_size 2 --nproc_per_node 2
  echo "== $preset, 2 GPUs, TP=2 + sequence parallel, bf16"
  python3 -m megatune verify --model_name_or_path $dir --bf16 true --tensor_model_parallel_size 2 --sequence_parallel true --nproc_per_node 2
  echo "== $preset, 2 GPUs, PP=2, bf16"
  python3 -m megatune verify --model_name_or_path $dir --bf16 true --pipeline_model_parallel_size 2 --nproc_per_node 2
  rm -rf $dir
done

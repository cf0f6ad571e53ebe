#!/usr/bin/env bash
# `megatune train` on GPUs: a Llama-3.2-1B-shaped model (random weights), bf16, pt on a synthetic
# corpus, seq 2048, global batch 8 sequences (micro-batch 1), 30 steps; and, as the baseline, a
# plain transformers training loop on the same shape and batch on one GPU.
# From the repository root on a machine with 2 GPUs:
#   bash benchmarks/train_gpu.sh OUT_DIR [baseline] [1gpu] [tp2] [pp2] [dp2]   (default: all)
# The 1gpu run repeats last so that its number and the baseline's come from the same machine state.
set -u
out=${1:-/tmp/train_gpu}; shift || true
runs=${*:-baseline 1gpu tp2 pp2 dp2}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)/src" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
model=/tmp/llama-3.2-1b
if [ ! -f $model/tokenizer.json ]; then
  python3 -m megatune env
  python3 benchmarks/model_shapes.py --preset llama-3.2-1b --output_dir $model --dtype bfloat16
  python3 -c "from megatune.tiny_tokenizer import make_tiny_tokenizer; make_tiny_tokenizer('$model')"
  python3 benchmarks/synthetic_corpus.py --output_dir /tmp/corpus --documents 700 --words 1500
fi
common="--model_name_or_path $model --stage pt --dataset synthetic_corpus --dataset_dir /tmp/corpus
  --cutoff_len 2048 --preprocessing_num_workers 8 --bf16 true --per_device_train_batch_size 1
  --max_steps 30 --learning_rate 1e-4 --warmup_steps 3 --logging_steps 5 --report_to none
  --overwrite_output_dir true"
for run in $runs; do
  echo "== $run"
  case $run in
    baseline) for precision in amp bf16; do
                CUDA_VISIBLE_DEVICES=0 python3 benchmarks/hf_train_baseline.py --model_dir $model --seq_len 2048 \
                  --micro_batch 1 --grad_accum 8 --steps 30 --precision $precision | tee "$out/hf_baseline_$precision.json"
              done ;;
    1gpu) CUDA_VISIBLE_DEVICES=0 python3 -m megatune train $common --gradient_accumulation_steps 8 \
            --output_dir /tmp/run_$run --save_steps 30 ;;  # also times a checkpoint save and the HF export
    tp2) python3 -m megatune train $common --gradient_accumulation_steps 8 --output_dir /tmp/run_$run \
           --save_steps 1000 --nproc_per_node 2 --tensor_model_parallel_size 2 --sequence_parallel true ;;
    pp2) python3 -m megatune train $common --gradient_accumulation_steps 8 --output_dir /tmp/run_$run \
           --save_steps 1000 --nproc_per_node 2 --pipeline_model_parallel_size 2 ;;
    dp2) python3 -m megatune train $common --gradient_accumulation_steps 4 --output_dir /tmp/run_$run \
           --save_steps 1000 --nproc_per_node 2 ;;
  esac
  [ -f /tmp/run_$run/trainer_log.jsonl ] && cp /tmp/run_$run/trainer_log.jsonl "$out/trainer_log_$run.jsonl"
done
exit 0

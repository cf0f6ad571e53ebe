#!/usr/bin/env bash
# 50 bf16 steps of `megatune train` with the GPU fast path (the default) and with every fusion
# key off, same model (Qwen3-1.7B shape, random weights), data (synthetic corpus, pt, seq 2048)
# and seed, on one GPU; the per-step losses are compared by the caller.
#   bash benchmarks/fast_vs_plain_gpu.sh OUT_DIR
set -u
out=${1:-/tmp/fast_vs_plain}; mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)/src" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
model=/tmp/qwen3-1.7b
python3 benchmarks/model_shapes.py --preset qwen3-1.7b --output_dir $model --dtype bfloat16
python3 -c "from megatune.tiny_tokenizer import make_tiny_tokenizer; make_tiny_tokenizer('$model')"
python3 benchmarks/synthetic_corpus.py --output_dir /tmp/corpus --documents 400 --words 1500
common="--model_name_or_path $model --stage pt --dataset synthetic_corpus --dataset_dir /tmp/corpus --cutoff_len 2048
  --bf16 true --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --max_steps 50 --learning_rate 1e-4
  --warmup_steps 5 --logging_steps 1 --report_to none --overwrite_output_dir true --save_steps 1000 --seed 1"
plain="--persist_layer_norm false --apply_rope_fusion false --gradient_accumulation_fusion false --cross_entropy_loss_fusion false"
for run in fast plain; do
  extra=""; [ $run = plain ] && extra=$plain
  python3 -m megatune train $common $extra --output_dir /tmp/run_$run > "$out/$run.log" 2>&1
  tail -2 "$out/$run.log"; cp /tmp/run_$run/trainer_log.jsonl "$out/trainer_log_$run.jsonl"
done
exit 0

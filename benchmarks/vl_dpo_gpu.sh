#!/usr/bin/env bash
# GPU records for the vision-language and DPO issues, each beside its baseline in the same call.
#   bash benchmarks/vl_dpo_gpu.sh OUT_DIR vl  [LAYERS]  -- 2 GPUs: Qwen2-VL-7B shape (LAYERS decoder layers,
#        full vision tower), 512x512 images: megatune TP=2+SP and PP=2, transformers amp on 1 GPU
#   bash benchmarks/vl_dpo_gpu.sh OUT_DIR dpo          -- 1 GPU: Qwen3-1.7B shape, DPO vs SFT on the same data
set -u
out=${1:-/tmp/vl_dpo}; what=${2:-vl}; layers=${3:-8}
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)/src" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python3 -m megatune env | tee "$out/env.txt"
if [ "$what" = vl ]; then
  model=/tmp/qwen2vl7b; data=/tmp/vl_data
  python3 benchmarks/vl_shape.py --output_dir $model --layers "$layers" --data_dir $data --rows 64 --image_size 512
  common="--model_name_or_path $model --stage sft --dataset vl_bench --dataset_dir $data --template qwen2_vl
    --cutoff_len 1024 --bf16 true --per_device_train_batch_size 1 --gradient_accumulation_steps 4
    --max_steps 8 --learning_rate 1e-5 --logging_steps 1 --report_to none --overwrite_output_dir true --save_steps 1000"
  for run in tp2_sp pp2; do
    case $run in
      tp2_sp) par="--tensor_model_parallel_size 2 --sequence_parallel true" ;;
      pp2) par="--pipeline_model_parallel_size 2" ;;
    esac
    echo "== $run"
    python3 -m megatune train $common $par --nproc_per_node 2 --output_dir /tmp/vl_$run > "$out/vl_$run.log" 2>&1
    tail -3 "$out/vl_$run.log"; cp /tmp/vl_$run/trainer_log.jsonl "$out/trainer_log_vl_$run.jsonl"
  done
  echo "== transformers"
  printf "model_name_or_path: $model\nstage: sft\ndataset: vl_bench\ndataset_dir: $data\ntemplate: qwen2_vl\ncutoff_len: 1024\nper_device_train_batch_size: 1\ngradient_accumulation_steps: 4\n" > /tmp/vl_hf.yaml
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/hf_vl_train_baseline.py /tmp/vl_hf.yaml --steps 6 --warmup 2 2>&1 | tail -1 | tee "$out/hf_vl_amp.json"
else
  model=/tmp/qwen3-1.7b; data=/tmp/pairs
  python3 benchmarks/model_shapes.py --preset qwen3-1.7b --output_dir $model --dtype bfloat16
  python3 -c "from megatune.tiny_tokenizer import make_tiny_tokenizer; make_tiny_tokenizer('$model')"
  python3 benchmarks/synthetic_corpus.py --output_dir $data --documents 64 --words 300 --pairs
  common="--model_name_or_path $model --dataset_dir $data --template qwen3_nothink --cutoff_len 2048 --bf16 true
    --max_steps 8 --learning_rate 1e-6 --logging_steps 1 --report_to none --overwrite_output_dir true --save_steps 1000"
  echo "== dpo"
  python3 -m megatune train $common --stage dpo --dataset synthetic_pairs --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 4 --output_dir /tmp/dpo_run > "$out/dpo.log" 2>&1
  tail -3 "$out/dpo.log"; cp /tmp/dpo_run/trainer_log.jsonl "$out/trainer_log_dpo.jsonl"
  echo "== sft"
  python3 -m megatune train $common --stage sft --dataset synthetic_chosen --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 4 --output_dir /tmp/sft_run > "$out/sft.log" 2>&1
  tail -3 "$out/sft.log"; cp /tmp/sft_run/trainer_log.jsonl "$out/trainer_log_sft.jsonl"
fi
exit 0

"""Every key of LLaMA-Factory's model/data/finetuning/training arguments, of mcore_adapter's
`DistributingParallelArguments`/`MegatronArguments`, and of the Hugging Face
`Seq2SeqTrainingArguments` that LLaMA-Factory passes through, with what megatune does with it.

Three statuses (docs/config.md is generated from this module and `config.KEYS`; a test keeps
them equal):
- honoured: a field of `config.py` (or an `ALIASES` name for one), same meaning;
- no-op: accepted, changes nothing here (said once at start-up), with the reason;
- refused: the reason and what to do instead. A refused key set to its "off" value (false, 0,
  null, empty) is accepted silently, so LLaMA-Factory YAMLs that spell out defaults still load.
"""

from __future__ import annotations

# Key names taken from the reference projects (LLaMA-Factory src/llamafactory/hparams/*.py,
# ROLL mcore_adapter/src/mcore_adapter/training_args.py); the test checks each is classified.
LLAMAFACTORY_KEYS = """
model_name_or_path adapter_name_or_path adapter_folder cache_dir use_fast_tokenizer resize_vocab
split_special_tokens add_tokens add_special_tokens new_special_tokens_config init_special_tokens model_revision
low_cpu_mem_usage rope_scaling flash_attn shift_attn mixture_of_depths use_unsloth use_unsloth_gc
enable_liger_kernel moe_aux_loss_coef disable_gradient_checkpointing use_reentrant_gc upcast_layernorm
upcast_lmhead_output train_from_scratch infer_backend offload_folder use_kv_cache use_v1_kernels infer_dtype
hf_hub_token ms_hub_token om_hub_token print_param_status trust_remote_code
quantization_method quantization_bit quantization_type double_quantization quantization_device_map
image_do_pan_and_scan crop_to_patches video_max_pixels video_min_pixels video_fps video_maxlen
use_audio_in_video audio_sampling_rate
export_dir export_size export_device export_quantization_bit export_quantization_dataset
export_quantization_nsamples export_quantization_maxlen export_legacy_format export_hub_model_id
vllm_maxlen vllm_gpu_util vllm_enforce_eager vllm_max_lora_rank vllm_config
sglang_maxlen sglang_mem_fraction sglang_tp_size sglang_config sglang_lora_backend
use_kt kt_cpu_activation kt_weight_path kt_non_expert_weight_path kt_expert_checkpoint_path kt_use_lora_experts
kt_lora_expert_num kt_lora_expert_intermediate_size
compute_dtype device_map model_max_length block_diag_attn
template dataset eval_dataset dataset_dir media_dir cutoff_len train_on_prompt mask_history streaming buffer_size
mix_strategy interleave_probs overwrite_cache preprocessing_batch_size preprocessing_num_workers max_samples
eval_num_beams ignore_pad_token_for_loss val_size eval_on_each_dataset packing neat_packing tool_format
default_system enable_thinking preserve_thinking tokenized_path data_shared_file_system
freeze_trainable_layers freeze_trainable_modules freeze_extra_modules
additional_target lora_alpha lora_dropout lora_rank lora_target loraplus_lr_ratio loraplus_lr_embedding use_rslora
use_dora pissa_init pissa_iter pissa_convert create_new_adapter module_dropout oft_rank oft_block_size oft_target
pref_bco_weight kto_chosen_weight kto_rejected_weight ppo_buffer_size ppo_epochs ppo_score_norm ppo_target
ppo_whiten_rewards ref_model_adapters ref_model_quantization_bit reward_model reward_model_adapters
reward_model_quantization_bit reward_model_type ld_alpha
use_galore galore_target galore_rank galore_update_interval galore_scale galore_proj_type galore_layerwise
use_apollo apollo_target apollo_rank apollo_update_interval apollo_scale apollo_proj apollo_proj_type
apollo_scale_type apollo_layerwise apollo_scale_front
use_badam badam_mode badam_start_block badam_switch_mode badam_switch_interval badam_update_ratio badam_mask_mode
badam_verbose
use_swanlab swanlab_project swanlab_workspace swanlab_run_name swanlab_mode swanlab_api_key swanlab_logdir
swanlab_lark_webhook_url swanlab_lark_secret
pure_bf16 stage finetuning_type use_llama_pro use_adam_mini use_mca use_megatron_bridge megatron_bridge_args
use_hyper_parallel hyper_parallel_args hyper_parallel_cp_size use_muon use_dft_loss use_asft_loss asft_alpha
use_eaft_loss eaft_alpha compute_accuracy disable_shuffling early_stopping_steps plot_loss
include_effective_tokens_per_second
ray_num_workers ray_init_kwargs master_addr master_port
enable_torch_profiler profiler_output_dir profiler_wait_steps profiler_warmup_steps profiler_active_steps
profiler_repeat profiler_record_shapes profiler_profile_memory profiler_with_stack profile_modules
fp8 fp8_backend fp8_enable_fsdp_float8_all_gather overwrite_output_dir
""".split()

# Keys the lead's stage-dpo and vision-language work owns (refused here until config.py has them).
LEAD_KEYS = """pref_beta pref_ftx pref_loss dpo_label_smoothing simpo_gamma ref_model image_max_pixels
image_min_pixels freeze_vision_tower freeze_multi_modal_projector freeze_language_model""".split()

MCORE_ADAPTER_KEYS = """
tensor_model_parallel_size pipeline_model_parallel_size sequence_parallel virtual_pipeline_model_parallel_size
context_parallel_size expert_model_parallel_size expert_tensor_parallel_size
account_for_embedding_in_pipeline_split account_for_loss_in_pipeline_split pipeline_model_parallel_layout
overlap_p2p_comm variable_seq_lengths recompute_granularity recompute_method recompute_modules
recompute_num_layers bias_activation_fusion apply_rope_fusion cross_entropy_loss_fusion moe_layer_recompute
moe_token_dispatcher_type moe_aux_loss_coeff moe_grouped_gemm moe_expert_capacity_factor
moe_pad_expert_input_to_capacity moe_token_drop_policy moe_shared_expert_overlap moe_enable_routing_replay
moe_router_dtype mtp_num_layers calculate_per_token_loss micro_batch_size transformer_impl cuda_graph_impl
cuda_graph_scope fp8_recipe fp8_param fp8 fp8_format use_flash_attn use_flash_attn_npu_batch_invariant
additional_configs
accumulate_allreduce_grads_in_fp32 use_distributed_optimizer distrib_optim_fully_reshardable
distrib_optim_fully_reshardable_mem_efficient overlap_grad_reduce delay_grad_reduce overlap_param_gather
check_for_nan_in_loss_and_grad ddp_average_in_collective ddp_bucket_size optimizer optimizer_cpu_offload
optimizer_offload_fraction save_hf_model save_merged_model ckpt_format ckpt_d2h_non_blocking sequence_packing
compile_warmup
""".split()

# The field names of transformers' Seq2SeqTrainingArguments (5.x), written out so that checking a
# YAML needs no transformers import (seconds: a config typo must fail at once);
# tests/test_ux.py keeps it equal to the installed version's `hf_trainer_keys()`.
HF_TRAINER_KEYS = """
accelerator_config activation_checkpointing activation_checkpointing_kwargs adam_beta1 adam_beta2 adam_epsilon
auto_find_batch_size average_tokens_across_devices batch_eval_metrics bf16 bf16_full_eval data_seed
dataloader_drop_last dataloader_in_order dataloader_multiprocessing_context dataloader_num_workers
dataloader_persistent_workers dataloader_pin_memory dataloader_prefetch_factor ddp_backend
ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout debug
deepspeed disable_tqdm do_eval do_predict do_train enable_jit_checkpoint eval_accumulation_steps eval_delay
eval_do_concat_batches eval_on_start eval_steps eval_strategy eval_use_gather_object fp16 fp16_full_eval fsdp
fsdp_config full_determinism generation_config generation_max_length generation_num_beams
gradient_accumulation_steps gradient_checkpointing gradient_checkpointing_kwargs greater_is_better
hub_always_push hub_model_id hub_private_repo hub_revision hub_strategy hub_token ignore_data_skip
include_for_metrics include_num_input_tokens_seen label_names label_smoothing_factor learning_rate
length_column_name liger_kernel_config load_best_model_at_end local_rank log_level log_level_replica
log_on_each_node logging_first_step logging_nan_inf_filter logging_steps logging_strategy lr_scheduler_kwargs
lr_scheduler_type max_grad_norm max_steps metric_for_best_model neftune_noise_alpha num_train_epochs optim
optim_args optim_target_modules output_dir parallelism_config per_device_eval_batch_size
per_device_train_batch_size predict_with_generate prediction_loss_only project push_to_hub
remove_unused_columns report_to restore_callback_states_from_checkpoint resume_from_checkpoint run_name
save_on_each_node save_only_model save_steps save_strategy save_total_limit seed skip_memory_metrics
sortish_sampler tf32 torch_compile torch_compile_backend torch_compile_mode torch_empty_cache_steps
trackio_bucket_id trackio_space_id trackio_static_space_id train_sampling_strategy use_cache use_cpu
use_liger_kernel warmup_steps weight_decay
""".split()

# Other names for honoured keys: the alias's value is stored under the key.
ALIASES = {
    "moe_aux_loss_coef": "moe_aux_loss_coeff",  # LLaMA-Factory's name (the router's balancing-loss coefficient)
    "micro_batch_size": "per_device_train_batch_size",  # mcore_adapter's name
    "swanlab_run_name": "run_name",  # LLaMA-Factory's name for the SwanLab experiment's name
}

# Switches that set other keys (config.build_config applies them): key -> meaning.
SWITCHES = {
    "use_swanlab": "true adds swanlab to report_to (LLaMA-Factory's switch)",
    "gradient_checkpointing": "true means recompute_granularity: full (every layer recomputed)",
}

_PERF = "a speed/memory option megatune does not implement; results are the same without it"
_INFERENCE = "an inference/generation option; training does not use it"
_HUB = "megatune reads local folders only and downloads nothing"

NOOP = {
    # Video frame settings shape video rows only (LLaMA-Factory's qwen2_vl_full.yaml sets one):
    # harmless with image data; a row with a video is refused when the data is read.
    **{k: "it only shapes video rows; videos are not supported yet (a row with one is refused when read)"
       for k in ("video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen")},
    # LLaMA-Factory model arguments
    "cache_dir": _HUB, "model_revision": _HUB, "hf_hub_token": _HUB, "ms_hub_token": _HUB, "om_hub_token": _HUB,
    "use_fast_tokenizer": "the tokenizer is loaded with transformers' AutoTokenizer (fast where the folder has one)",
    "low_cpu_mem_usage": "weights are always read sliced, each rank only its own part",
    "flash_attn": "attention is torch's scaled_dot_product_attention, which picks the flash kernel where the device has one",
    "enable_liger_kernel": _PERF, "use_v1_kernels": _PERF, "use_unsloth_gc": _PERF, "use_reentrant_gc": _PERF,
    "disable_gradient_checkpointing": "activation recompute is off unless recompute_granularity (or gradient_checkpointing) asks for it",
    "upcast_layernorm": "RMSNorm already computes in fp32",
    "upcast_lmhead_output": "the loss is computed from fp32 logits already",
    "infer_backend": _INFERENCE, "offload_folder": _INFERENCE, "use_kv_cache": _INFERENCE, "infer_dtype": _INFERENCE,
    "vllm_maxlen": _INFERENCE, "vllm_gpu_util": _INFERENCE, "vllm_enforce_eager": _INFERENCE,
    "vllm_max_lora_rank": _INFERENCE, "vllm_config": _INFERENCE, "sglang_maxlen": _INFERENCE,
    "sglang_mem_fraction": _INFERENCE, "sglang_tp_size": _INFERENCE, "sglang_config": _INFERENCE,
    "sglang_lora_backend": _INFERENCE, "eval_num_beams": _INFERENCE, "predict_with_generate": _INFERENCE,
    "generation_max_length": _INFERENCE, "generation_num_beams": _INFERENCE, "generation_config": _INFERENCE,
    "print_param_status": "megatune prints the layout and model notes at start instead",
    "compute_dtype": "set by LLaMA-Factory itself; megatune derives it from bf16/fp16",
    "device_map": "Megatron places each rank's shard on its own device",
    "model_max_length": "set by LLaMA-Factory itself from cutoff_len",
    "block_diag_attn": "set by LLaMA-Factory itself from neat_packing",
    # data
    "preprocessing_batch_size": "only the batch size of the encoding map; the encoded rows are the same",
    "ignore_pad_token_for_loss": "padding is never learned here",
    "data_shared_file_system": "rank 0 encodes first and the others read its cache either way",
    # finetuning
    "use_mca": "megatune is a Megatron-core trainer already",
    "use_megatron_bridge": "megatune is a Megatron-core trainer already",
    "include_effective_tokens_per_second": "tokens_per_s (real tokens, padding excluded) is always logged",
    # Hugging Face TrainingArguments
    "do_eval": "evaluation runs when eval_dataset or val_size gives data (see eval_strategy)",
    "do_predict": _INFERENCE,
    "logging_dir": "TensorBoard logs go to output_dir/runs", "logging_strategy": "rows are written every logging_steps",
    "logging_first_step": "step 1 is always logged when logging_steps divides it; rows are written every logging_steps",
    "logging_nan_inf_filter": "non-finite steps are skipped and logged as null",
    "save_only_model": "checkpoints always hold the optimizer state (so they resume); the final export is model-only",
    "save_safetensors": "exports are always safetensors", "save_on_each_node": "output_dir is assumed shared",
    "dataloader_num_workers": "samples are prepared in memory (or streamed) by the trainer itself",
    "dataloader_pin_memory": "samples are prepared by the trainer itself",
    "dataloader_persistent_workers": "samples are prepared by the trainer itself",
    "dataloader_prefetch_factor": "samples are prepared by the trainer itself",
    "torch_compile": _PERF, "torch_compile_backend": _PERF, "torch_compile_mode": _PERF,
    "gradient_checkpointing_kwargs": "recompute is Megatron's, set with recompute_* keys",
    "ddp_find_unused_parameters": "Megatron's DDP needs no unused-parameter search",
    "ddp_broadcast_buffers": "the model has no buffers to broadcast", "ddp_backend": "NCCL on GPU, gloo on CPU",
    "tf32": _PERF, "disable_tqdm": "the progress bar shows only in a terminal",
    "remove_unused_columns": "the data path keeps only what the stage encodes",
    "label_names": "labels come from the stage", "length_column_name": "not used",
    "skip_memory_metrics": "peak memory is always logged", "hub_model_id": _HUB, "hub_token": _HUB,
    "hub_strategy": _HUB, "hub_private_repo": _HUB, "local_rank": "set by the launcher",
    "half_precision_backend": "precision is Megatron's (bf16/fp16 keys)", "bf16_full_eval": "evaluation runs in the training dtype",
    "fp16_full_eval": "evaluation runs in the training dtype", "average_tokens_across_devices":
    "the loss is always a token mean over the whole global batch (all ranks)",
    "include_num_input_tokens_seen": "tokens_per_s is always logged", "ignore_data_skip": "resume restores the data position exactly",
    "full_determinism": "runs are deterministic for a given seed and layout on CPU; on GPU as deterministic as the kernels",
    "eval_accumulation_steps": "evaluation sums on the fly", "use_ipex": _PERF, "jit_mode_eval": _PERF,
    "optim_target_modules": "full fine-tuning trains every weight", "log_level": "megatune prints its own lines",
    "log_level_replica": "only rank 0 prints", "log_on_each_node": "only rank 0 prints",
    # mcore_adapter
    "overlap_p2p_comm": _PERF, "delay_grad_reduce": _PERF,
    "moe_shared_expert_overlap": _PERF, "ckpt_d2h_non_blocking": _PERF, "compile_warmup": _PERF,
    "cuda_graph_impl": _PERF, "cuda_graph_scope": _PERF, "use_flash_attn": "an Ascend NPU switch",
    "use_flash_attn_npu_batch_invariant": "an Ascend NPU switch",
    "variable_seq_lengths": "every micro-batch of a step is padded to one length where the schedule needs it",
    "calculate_per_token_loss": "always on: the loss is a token mean over the global batch",
    "check_for_nan_in_loss_and_grad": "always on: non-finite steps are skipped (see max_nonfinite_steps)",
    "ddp_average_in_collective": "gradients are summed and divided by the global token count",
    "accumulate_allreduce_grads_in_fp32": "always on: gradients are accumulated and reduced in fp32",
    "distrib_optim_fully_reshardable": "always on: the optimizer state is saved fully reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": "the optimizer state is saved fully reshardable",
    "save_hf_model": "always on: a Hugging Face checkpoint is written to output_dir at the end",
    "save_merged_model": "a LoRA option; full fine-tuning has nothing to merge",
    "moe_router_dtype": "the router computes in fp32 already",
}

# Keys that are no-ops only at some values: key -> (accepted values, what to do otherwise).
NOOP_VALUES = {
    "optim": (("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "adamw_apex_fused"),
              "megatune trains with Megatron's Adam with decoupled weight decay (AdamW); remove `optim`"),
    "optimizer": (("adam", "adamw"), "megatune trains with Megatron's Adam (AdamW); remove `optimizer`"),
    "save_strategy": (("steps",), "checkpoints are saved every save_steps; set save_steps instead"),
    "ckpt_format": (("torch_dist",), "checkpoints are Megatron torch_dist; remove `ckpt_format`"),
}

_LORA = "only full fine-tuning is supported (finetuning_type: full); remove the LoRA/OFT/freeze keys"
_OPTIM = "megatune trains with Megatron's Adam; remove the alternative-optimizer keys"
_RLHF = "megatune trains stages pt, sft and dpo; PPO/KTO/reward-model keys do not apply"
_QUANT = "quantized training is not supported; train in bf16 and quantize the exported model"
_EXPORT = "use `megatune export --checkpoint_path DIR --output_path DIR` (and quantize with another tool)"
_VOCAB = "changing the vocabulary is not supported; add the tokens and resize the embeddings with transformers first"
_MEDIA = "video and audio rows are not supported"
_FP8 = "FP8 training needs Transformer Engine, which megatune does not use; train in bf16"
_PP_SPLIT = "uneven pipeline splits are not supported: layers are split evenly over pipeline stages"

REFUSED = {
    "deepspeed": "megatune shards with Megatron-core; remove it and use the *_parallel_size keys",
    "fsdp": "megatune shards with Megatron-core; remove it and use the *_parallel_size keys",
    "fsdp_config": "megatune shards with Megatron-core; remove it and use the *_parallel_size keys",
    "accelerator_config": "megatune does not run on Accelerate; remove it",
    **{k: _LORA for k in ("adapter_name_or_path", "adapter_folder", "freeze_trainable_layers", "freeze_trainable_modules",
                          "freeze_extra_modules", "additional_target", "lora_alpha", "lora_dropout", "lora_rank",
                          "lora_target", "loraplus_lr_ratio", "loraplus_lr_embedding", "use_rslora", "use_dora",
                          "pissa_init", "pissa_iter", "pissa_convert", "create_new_adapter", "module_dropout",
                          "oft_rank", "oft_block_size", "oft_target", "use_llama_pro")},
    **{k: _QUANT for k in ("quantization_method", "quantization_bit", "quantization_type", "double_quantization",
                           "quantization_device_map")},
    **{k: _EXPORT for k in ("export_dir", "export_size", "export_device", "export_quantization_bit",
                            "export_quantization_dataset", "export_quantization_nsamples", "export_quantization_maxlen",
                            "export_legacy_format", "export_hub_model_id")},
    **{k: _VOCAB for k in ("resize_vocab", "add_tokens", "add_special_tokens", "new_special_tokens_config",
                           "init_special_tokens", "split_special_tokens")},
    **{k: _MEDIA for k in ("use_audio_in_video", "audio_sampling_rate")},
    **{k: "not used by the Qwen2-VL image processor megatune runs" for k in ("image_do_pan_and_scan", "crop_to_patches")},
    "media_dir": "image paths are taken from dataset_dir (or absolute); move the images there",
    **{k: _RLHF for k in ("pref_bco_weight", "kto_chosen_weight", "kto_rejected_weight", "ppo_buffer_size", "ppo_epochs",
                          "ppo_score_norm", "ppo_target", "ppo_whiten_rewards", "ref_model_adapters",
                          "ref_model_quantization_bit", "reward_model", "reward_model_adapters",
                          "reward_model_quantization_bit", "reward_model_type", "ld_alpha")},
    **{k: _OPTIM for k in ("use_galore", "galore_target", "galore_rank", "galore_update_interval", "galore_scale",
                           "galore_proj_type", "galore_layerwise", "use_apollo", "apollo_target", "apollo_rank",
                           "apollo_update_interval", "apollo_scale", "apollo_proj", "apollo_proj_type",
                           "apollo_scale_type", "apollo_layerwise", "apollo_scale_front", "use_badam", "badam_mode",
                           "badam_start_block", "badam_switch_mode", "badam_switch_interval", "badam_update_ratio",
                           "badam_mask_mode", "badam_verbose", "use_adam_mini", "use_muon", "adafactor",
                           "optimizer_cpu_offload", "optimizer_offload_fraction")},
    **{k: "not passed on: report_to: swanlab takes swanlab_project, swanlab_mode and run_name; set the rest "
          "with `swanlab login` / SwanLab's environment variables" for k in (
        "swanlab_workspace", "swanlab_api_key", "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret")},
    **{k: "Ray is not supported; start megatune with --nproc_per_node or torchrun" for k in (
        "ray_num_workers", "ray_init_kwargs", "master_addr", "master_port")},
    **{k: "the torch profiler is not wired in; profile with an external tool" for k in (
        "enable_torch_profiler", "profiler_output_dir", "profiler_wait_steps", "profiler_warmup_steps",
        "profiler_active_steps", "profiler_repeat", "profiler_record_shapes", "profiler_profile_memory",
        "profiler_with_stack", "profile_modules")},
    **{k: _FP8 for k in ("fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather", "fp8_recipe", "fp8_param", "fp8_format")},
    **{k: "KTransformers is a separate backend; remove the kt keys" for k in (
        "use_kt", "kt_cpu_activation", "kt_weight_path", "kt_non_expert_weight_path", "kt_expert_checkpoint_path",
        "kt_use_lora_experts", "kt_lora_expert_num", "kt_lora_expert_intermediate_size")},
    **{k: "Megatron-Bridge / HyperParallel are other backends; megatune's parallel keys are the *_parallel_size ones"
       for k in ("megatron_bridge_args", "use_hyper_parallel", "hyper_parallel_args", "hyper_parallel_cp_size")},
    **{k: _PP_SPLIT for k in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
                              "pipeline_model_parallel_layout")},
    "rope_scaling": "set rope scaling in the model's config.json (megatune reads it from there)",
    "shift_attn": "LongLoRA's shifted sparse attention is not supported",
    "mixture_of_depths": "mixture-of-depths conversion is not supported",
    "use_unsloth": "Unsloth patches Hugging Face models; megatune trains on Megatron-core",
    "train_from_scratch": "megatune fine-tunes a checkpoint's weights; random initialisation is not offered",
    "tool_format": "the chat template decides how tools are written; pick the template instead",
    "default_system": "not supported yet: put the system prompt in the data (a system column or message)",
    "preserve_thinking": "not supported yet: history reasoning follows the model's own chat template",
    "buffer_size": "the streaming shuffle buffer is not configurable yet",
    "eval_on_each_dataset": "evaluation reports one loss over all eval data",
    "pure_bf16": "bf16: true trains bf16 weights with fp32 master weights in the optimizer; pure bf16 is not offered",
    "use_dft_loss": "only the standard cross-entropy loss is implemented", "use_asft_loss": "only the standard cross-entropy loss is implemented",
    "asft_alpha": "only the standard cross-entropy loss is implemented", "use_eaft_loss": "only the standard cross-entropy loss is implemented",
    "eaft_alpha": "only the standard cross-entropy loss is implemented",
    "compute_accuracy": "token accuracy is not computed; eval_loss is reported",
    "disable_shuffling": "not supported yet: the data order is always the seeded shuffle",
    "early_stopping_steps": "early stopping is not supported; set max_steps",
    "recompute_modules": "choosing modules to recompute is not supported; recompute_granularity: selective recomputes core attention",
    "moe_layer_recompute": "use recompute_granularity: full (whole layers, MoE included)",
    "moe_enable_routing_replay": "routing replay is an RL feature, not supported",
    "mtp_num_layers": "multi-token prediction layers are not supported",
    "additional_configs": "set each key directly in the YAML",
    "sequence_packing": "use packing: true (with neat_packing: true for attention kept inside each document)",
    "load_best_model_at_end": "the final checkpoint is exported; pick another checkpoint-N with megatune export",
    "metric_for_best_model": "the final checkpoint is exported; pick another checkpoint-N with megatune export",
    "greater_is_better": "the final checkpoint is exported; pick another checkpoint-N with megatune export",
    "push_to_hub": "upload output_dir yourself (huggingface-cli upload)",
    "label_smoothing_factor": "label smoothing is not implemented", "neftune_noise_alpha": "NEFTune is not implemented",
    "group_by_length": "length-grouped sampling is not implemented; packing: true removes padding instead",
    "auto_find_batch_size": "set per_device_train_batch_size", "use_cpu": "megatune uses the GPU when there is one, else the CPU",
    "lr_scheduler_kwargs": "not supported; min_lr sets the floor of the schedule",
    "per_gpu_train_batch_size": "use per_device_train_batch_size", "per_gpu_eval_batch_size": "use per_device_eval_batch_size",
    "data_seed": "the data order follows `seed`", "eval_on_start": "evaluation runs every eval_steps from the first",
    "eval_delay": "evaluation runs every eval_steps", "restore_callback_states_from_checkpoint": "there are no callbacks",
}

HF_GENERIC = ("a Hugging Face Trainer option megatune's Megatron trainer does not implement; remove it "
              "(docs/config.md lists every key)")

OFF_VALUES = (False, None, 0, 0.0, "", "false", "none", "null", "0", "no")


def hf_trainer_keys() -> set[str]:
    """The field names of transformers' Seq2SeqTrainingArguments (installed version)."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    return {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init and not f.name.startswith("_")}


def classify(key: str, value, honoured: set[str]) -> tuple[str, str]:
    """(status, text) for one YAML key and value: status is "honoured", "alias", "noop",
    "off" (a refused key at its off value: accepted silently), "refused" or "unknown"."""
    if key in honoured or key in SWITCHES:
        return "honoured", ""
    if key in ALIASES:
        return "alias", ALIASES[key]
    if key in NOOP:
        return "noop", NOOP[key]
    if key in NOOP_VALUES:
        accepted, fix = NOOP_VALUES[key]
        if value is None or str(value).lower() in accepted:
            return "noop", f"{key}: {value} is what megatune does"
        return "refused", f"value {value!r}: {fix}"
    reason = REFUSED.get(key)
    if reason is None and key in _hf_keys():
        reason = HF_GENERIC
    if reason is None:
        return "unknown", ""
    if value in OFF_VALUES or (isinstance(value, str) and value.lower() in OFF_VALUES) or value in ([], {}):
        return "off", reason
    return "refused", reason


def _hf_keys() -> set[str]:
    return set(HF_TRAINER_KEYS)


def key_table(honoured: dict[str, str]) -> list[tuple[str, str, str]]:
    """(key, status, meaning) for every key docs/config.md lists, sorted by key. `honoured` maps
    config.py's keys to their one-line meaning."""
    rows = {key: (key, "honoured", meaning) for key, meaning in honoured.items()}
    for alias, key in ALIASES.items():
        rows[alias] = (alias, "honoured", f"same as `{key}`")
    for key, meaning in SWITCHES.items():
        rows[key] = (key, "honoured", meaning)
    for key, reason in NOOP.items():
        rows.setdefault(key, (key, "no-op", reason))
    for key, (accepted, fix) in NOOP_VALUES.items():
        rows.setdefault(key, (key, "no-op", f"accepted as {' / '.join(accepted)}; otherwise refused: {fix}"))
    for key, reason in REFUSED.items():
        if key in LEAD_KEYS and key not in honoured:
            continue  # the lead's dpo/VL keys appear once config.py has them
        rows.setdefault(key, (key, "refused", reason))
    return [rows[k] for k in sorted(rows)]


def honoured_meanings() -> dict[str, str]:
    """config.py's keys with a one-line meaning: the field's own comment, else where the key
    comes from (its meaning is that project's)."""
    import re
    from pathlib import Path

    from megatune.config import KEYS

    comments = {}
    for line in (Path(__file__).parent / "config.py").read_text().splitlines():
        match = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    out = {}
    for key in KEYS:
        if key in comments:
            out[key] = comments[key]
        elif key in MCORE_ADAPTER_KEYS:
            out[key] = "as in Megatron-core / mcore_adapter"
        elif key in LLAMAFACTORY_KEYS or key in _hf_keys():
            out[key] = "as in LLaMA-Factory"
        else:
            out[key] = "megatune's own key (docs/train.md)"
    return out


def render_table() -> str:
    """The key table of docs/config.md (between its markers)."""
    lines = ["| key | status | meaning |", "|---|---|---|"]
    for key, status, meaning in key_table(honoured_meanings()):
        lines.append(f"| `{key}` | {status} | {meaning.replace('|', '/')} |")
    return "\n".join(lines) + "\n"

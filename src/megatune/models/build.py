"""Build this rank's Megatron model chunks for an HF checkpoint under the current parallel layout.

The family's provider supplies the checkpoint-dependent `TransformerConfig` fields and builds
each chunk; this module adds the run's parallel/precision settings, which are the same for
every family, and tags tensor-parallel weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from transformers import AutoConfig, PretrainedConfig

from megatune.config import Config
from megatune.models import get_provider
from megatune.models.mappings import Mapping, Shapes
from megatune.models.provider import ModelProvider


@dataclass
class ModelBundle:
    """Everything later stages need about the model being trained."""

    chunks: list[torch.nn.Module]  # one per virtual pipeline stage held by this rank
    provider: ModelProvider
    hf_config: PretrainedConfig
    hf: dict
    config: TransformerConfig
    mappings: tuple[Mapping, ...]  # the provider's table for this checkpoint's on-disk layout
    padded_vocab_size: int  # rows of the embedding / output layer (layers/vocab_padding.py)

    @property
    def tied(self) -> bool:
        return self.provider.tied_embeddings(self.hf)

    @property
    def vocab_size(self) -> int:
        """The HF vocabulary (the first `vocab_size` of `padded_vocab_size` rows are real)."""
        return self.provider.vocab_size(self.hf)

    @property
    def shapes(self) -> Shapes:
        """Attention head layout the fused-QKV mappings split by, and the vocabulary padding."""
        return Shapes(self.config.num_attention_heads, self.config.num_query_groups, self.config.kv_channels,
                      self.vocab_size, self.padded_vocab_size)

    def step_flops(self, doc_lens: list[int], image_grid_thw: list | None = None) -> float:
        return self.provider.step_flops(self.hf, doc_lens, image_grid_thw)


def load_hf_config(model_dir: str) -> tuple[PretrainedConfig, dict]:
    """The HF config object and its dict with class defaults filled in (e.g. tie_word_embeddings)."""
    hf_config = AutoConfig.from_pretrained(model_dir)
    return hf_config, hf_config.to_dict()


def param_dtype(config: Config) -> torch.dtype:
    if config.training.bf16:
        return torch.bfloat16
    if config.training.fp16:
        return torch.float16
    return torch.float32


def transformer_config(config: Config, hf: dict, provider: ModelProvider) -> TransformerConfig:
    """The provider's checkpoint fields plus the run's layout, precision and recompute keys."""
    p = config.parallel
    dtype = param_dtype(config)
    on_gpu = torch.cuda.is_available()
    if on_gpu:  # Megatron refuses the fusion flags unless their kernels are installed (launcher checks too)
        from megatune.layers.fused import enable_fast_path

        enable_fast_path()
    return TransformerConfig(
        **provider.transformer_kwargs(hf, config),
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,  # every weight comes from the HF checkpoint
        bias_activation_fusion=p.bias_activation_fusion,
        # The fused pieces are torch.compile'd / chunked kernels (layers/fused.py) installed when
        # CUDA is present; on CPU the plain formulas run.
        apply_rope_fusion=p.apply_rope_fusion and on_gpu,
        persist_layer_norm=p.persist_layer_norm and on_gpu,
        gradient_accumulation_fusion=p.gradient_accumulation_fusion and on_gpu,
        cross_entropy_loss_fusion=p.cross_entropy_loss_fusion and on_gpu,
        masked_softmax_fusion=False,
        recompute_granularity=p.recompute_granularity,
        recompute_method=p.recompute_method,
        recompute_num_layers=p.recompute_num_layers,
        # Pipeline stages exchange activations of one fixed shape per step (the trainer pads every
        # micro-batch of a step to the same length); Megatron's per-message shape exchange
        # deadlocks the interleaved schedule.
        variable_seq_lengths=False,
        # The trainer's loss is a global sum over the stage's loss units (engine/optim.py). Set at
        # build time: the MoE router reads it in its constructor to scale the aux loss to match.
        calculate_per_token_loss=True,
        moe_token_dispatcher_type=p.moe_token_dispatcher_type,
    )


def build_model(config: Config, model_dir: str) -> ModelBundle:
    """Read `model_dir/config.json`, build this rank's chunks (random-free: weights come from
    `models/weights.py:load_hf_weights` or a checkpoint). Raises UnsupportedModelError."""
    from megatune.layers.spec import set_transformer_impl

    set_transformer_impl(config.parallel.transformer_impl)
    hf_config, hf = load_hf_config(model_dir)
    provider = get_provider(hf, f"{model_dir}/config.json")
    tc = transformer_config(config, hf, provider)
    vocab, padded = provider.vocab_size(hf), provider.padded_vocab_size(hf, config.parallel)
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = provider.build_chunk(
            tc, hf, hf_config, stage,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            padded_vocab_size=padded,
        )
        mark_tensor_parallel_weights(model)
        if padded != vocab and getattr(model, "post_process", False):
            from megatune.layers.vocab_padding import exclude_padded_logits

            exclude_padded_logits(model.output_layer, vocab)  # padded logits: -inf before any softmax
        if tc.cross_entropy_loss_fusion:
            from megatune.layers.cross_entropy import use_fused_linear_cross_entropy

            use_fused_linear_cross_entropy(model, vocab_size=vocab if padded != vocab else None)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    mappings = provider.mappings(hf, checkpoint_weight_names(model_dir))
    return ModelBundle(chunks, provider, hf_config, hf, tc, mappings, padded)


def checkpoint_weight_names(model_dir: str) -> set[str] | None:
    """Tensor names of the HF checkpoint in `model_dir` (recorded ones for a training
    checkpoint's `hf/` folder); None when unknown."""
    from megatune.models.hf_io import weight_names

    names = weight_names(Path(model_dir))
    return None if names is None else set(names)


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Tag TP-sharded weights the way Megatron's initialisers would have.

    Megatron-core (0.16) sets `tensor_model_parallel`/`partition_dim` on a parallel layer's
    weight only inside its random initialiser, which `perform_initialization=False` skips (our
    weights come from the checkpoint). Untagged, every TP rank but the first counts as a
    duplicate in the gradient norm, so the norm, and with it gradient clipping, is wrong.
    """
    for module in model.modules():
        if isinstance(module, (tensor_parallel.ColumnParallelLinear, tensor_parallel.VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, tensor_parallel.RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            tensor_parallel.set_tensor_model_parallel_attributes(weight, True, dim, 1)

"""Build Megatron GPTModel chunks for an HF checkpoint under the current parallel layout."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from transformers import AutoConfig, PretrainedConfig

from megatune.config import Config
from megatune.layers.spec import decoder_spec
from megatune.models import get_family
from megatune.models.family import Family, dense_transformer_kwargs, head_dim, rope_theta
from megatune.models.mappings import Shapes


@dataclass
class ModelBundle:
    """Everything later stages need about the model being trained."""

    chunks: list[GPTModel]  # one per virtual pipeline stage held by this rank
    family: Family
    hf_config: PretrainedConfig
    hf: dict
    shapes: Shapes
    config: TransformerConfig

    @property
    def tied(self) -> bool:
        return bool(self.hf.get("tie_word_embeddings"))


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


def transformer_config(config: Config, hf: dict, family: Family) -> TransformerConfig:
    p = config.parallel
    dtype = param_dtype(config)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        **dense_transformer_kwargs(hf, family),
        **_moe_options(family.moe_kwargs(hf, config), config),
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
        apply_rope_fusion=p.apply_rope_fusion and on_gpu,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=p.recompute_granularity,
        recompute_method=p.recompute_method,
        recompute_num_layers=p.recompute_num_layers,
        # Pipeline stages exchange activations of one fixed shape per step (the trainer pads every
        # micro-batch of a step to the same length); Megatron's per-message shape exchange
        # deadlocks the interleaved schedule.
        variable_seq_lengths=False,
        # The trainer's loss is a global token mean (engine/optim.py). Set at build time: the MoE
        # router reads it in its constructor to scale the aux loss to match.
        calculate_per_token_loss=True,
        moe_token_dispatcher_type=p.moe_token_dispatcher_type,
    )


def _moe_options(moe: dict, config: Config) -> dict:
    """A MoE family's translated HF fields plus the run's token-dropping options."""
    if not moe:
        return moe
    p = config.parallel
    return {
        **moe,
        "moe_expert_capacity_factor": p.moe_expert_capacity_factor,
        "moe_token_drop_policy": p.moe_token_drop_policy,
        "moe_pad_expert_input_to_capacity": p.moe_pad_expert_input_to_capacity,
    }


def build_model(config: Config, model_dir: str) -> ModelBundle:
    hf_config, hf = load_hf_config(model_dir)
    family = get_family(hf, f"{model_dir}/config.json")
    tc = transformer_config(config, hf, family)
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    inv_freq = hf_inv_freq(family, hf_config)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=tc,
            transformer_layer_spec=decoder_spec(tc, family.qk_layernorm, stage),
            vocab_size=hf["vocab_size"],
            max_sequence_length=hf.get("max_position_embeddings") or 4096,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings")),
            position_embedding_type="rope",
            rotary_base=int(rope_theta(hf)),
            vp_stage=stage,
        )
        model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
        mark_tensor_parallel_weights(model)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    shapes = Shapes(tc.num_attention_heads, tc.num_query_groups, head_dim(hf))
    return ModelBundle(chunks, family, hf_config, hf, shapes, tc)


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


def hf_inv_freq(family: Family, hf_config: PretrainedConfig) -> torch.Tensor:
    """Rotary inverse frequencies computed by transformers itself (default, llama3, linear).

    Megatron's own llama3 scaling hard-codes the low/high frequency factors and the original
    context length; taking HF's tensor makes every scaling variant match by construction.
    """
    module_name, cls_name = family.rotary_embedding.rsplit(".", 1)
    rotary = getattr(importlib.import_module(module_name), cls_name)(config=hf_config)
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise ValueError("rope variants that rescale attention (e.g. yarn) are not supported yet")
    return rotary.inv_freq.detach().float().cpu()

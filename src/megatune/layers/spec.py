"""Which Megatron layer spec a model uses: Transformer Engine when usable, torch-native otherwise."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatune.layers.attention import SDPAttention
from megatune.layers.experts import GroupedExperts, grouped_mm_fn
from megatune.layers.local_dispatch import MoELayerWithSyncFreeDispatch
from megatune.layers.norm import RMSNorm


@dataclass(frozen=True)
class Backend:
    """The implementation chosen for each hot piece of the model; printed by `megatune env`."""

    name: str  # "te" or "torch"
    attention: str
    norm: str
    moe_experts: str


_IMPL = {"name": "local"}  # set from the run's `transformer_impl` by models/build.py


def set_transformer_impl(name: str) -> None:
    """`transformer_impl`: "local" (torch-native layers, the tested path) or "transformer_engine"."""
    _IMPL["name"] = name


def te_importable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def te_usable() -> bool:
    """Transformer Engine layers: only when the run asks for them (transformer_impl) and TE is there."""
    return _IMPL["name"] == "transformer_engine" and te_importable()


def choose_backend() -> Backend:
    if te_usable():
        return Backend("te", "TEDotProductAttention", "TENorm (fused into linear)", "TEGroupedMLP")
    return Backend(
        "torch",
        "torch scaled_dot_product_attention",
        "megatune RMSNorm (fp32, sequence-parallel aware)",
        "megatune GroupedExperts on torch grouped_mm (bf16; per-expert matmul otherwise)"
        if torch.cuda.is_available() and grouped_mm_fn() is not None
        else "megatune GroupedExperts, per-expert matmul fallback (torch grouped_mm runs on CUDA bf16)",
    )


def moe_experts_description(moe_grouped_gemm: bool) -> str:
    """What the MoE layers run their experts on, given the `moe_grouped_gemm` setting."""
    if te_usable() or moe_grouped_gemm:
        return choose_backend().moe_experts
    return "Megatron SequentialMLP (a loop over local experts; moe_grouped_gemm: false)"


def moe_layer_pattern(config: TransformerConfig) -> list[bool]:
    """Which global layers are MoE layers (Megatron's `moe_layer_freq`: an int or a 0/1 list)."""
    if not config.num_moe_experts:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    return [bool(x) for x in freq]


def decoder_spec(config: TransformerConfig, qk_layernorm: bool, vp_stage: int | None):
    """Decoder spec of this pipeline stage: dense layers, or MoE layers where the pattern says."""
    if te_usable():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
    # Spelled out as block submodules so the final norm is ours too (Megatron would pick
    # torch's RMSNorm, which refuses sequence parallelism).
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    moe = moe_layer_pattern(config)
    layers = range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage))
    return TransformerBlockSubmodules(
        layer_specs=[
            torch_native_layer_spec(qk_layernorm, config.num_moe_experts if moe[i] else None, config.moe_grouped_gemm)
            for i in layers
        ],
        layer_norm=RMSNorm,
    )


def moe_spec(num_experts: int, grouped_gemm: bool) -> ModuleSpec:
    """Megatron's MoE layer; experts on megatune's GroupedExperts (grouped GEMM) or, with
    `moe_grouped_gemm: false`, on Megatron's SequentialMLP (a Python loop over experts)."""
    spec = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)
    spec.module = MoELayerWithSyncFreeDispatch  # Megatron's MoELayer; sync-free permute (layers/local_dispatch.py)
    if grouped_gemm:
        spec.submodules.experts = ModuleSpec(module=GroupedExperts, submodules=spec.submodules.experts.submodules)
    return spec


def torch_native_layer_spec(qk_layernorm: bool, num_experts: int | None = None, grouped_gemm: bool = False) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=RMSNorm if qk_layernorm else IdentityOp,
                    k_layernorm=RMSNorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            )
            if num_experts is None
            else moe_spec(num_experts, grouped_gemm),
            mlp_bda=get_bias_dropout_add,
        ),
    )

"""What a model family declares, and the config translation shared by Llama-style decoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn.functional as F

from megatune.models.mappings import (
    ColumnParallel,
    FusedGateUp,
    FusedQKV,
    Mapping,
    Replicated,
    RowParallel,
)


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    """One supported HF `model_type`: how its config and weights map onto Megatron's GPTModel."""

    model_type: str
    rotary_embedding: str  # import path of the HF rotary class, used to reproduce its inv_freq
    mappings: tuple[Mapping, ...]
    qk_layernorm: bool = False
    qkv_bias: Callable[[dict], bool] = lambda hf: False
    checks: tuple[Callable[[dict], str | None], ...] = field(default_factory=tuple)
    # HF config (+ run config, for YAML overrides) -> Megatron MoE kwargs; dense families: none
    moe_kwargs: Callable[[dict, object], dict] = lambda hf, config: {}

    def problems(self, hf: dict) -> list[str]:
        return [msg for check in self.checks if (msg := check(hf))]


def dense_decoder_mappings(qkv_bias: bool, qk_norm: bool) -> tuple[Mapping, ...]:
    """Mappings of a Llama-style decoder (HF `model.layers.*`) onto Megatron's GPTModel."""
    attn = "decoder.layers.{layer}.self_attention"
    hf_attn = "model.layers.{layer}.self_attn"
    out: list[Mapping] = [
        ColumnParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Replicated("decoder.layers.{layer}.input_layernorm.weight", "model.layers.{layer}.input_layernorm.weight"),
        FusedQKV(f"{attn}.linear_qkv.weight", f"{hf_attn}.q_proj.weight", f"{hf_attn}.k_proj.weight", f"{hf_attn}.v_proj.weight"),
        RowParallel(f"{attn}.linear_proj.weight", f"{hf_attn}.o_proj.weight"),
        Replicated("decoder.layers.{layer}.pre_mlp_layernorm.weight", "model.layers.{layer}.post_attention_layernorm.weight"),
        FusedGateUp(
            "decoder.layers.{layer}.mlp.linear_fc1.weight",
            "model.layers.{layer}.mlp.gate_proj.weight",
            "model.layers.{layer}.mlp.up_proj.weight",
        ),
        RowParallel("decoder.layers.{layer}.mlp.linear_fc2.weight", "model.layers.{layer}.mlp.down_proj.weight"),
        Replicated("decoder.final_layernorm.weight", "model.norm.weight"),
        ColumnParallel("output_layer.weight", "lm_head.weight"),
    ]
    if qkv_bias:
        out.append(FusedQKV(f"{attn}.linear_qkv.bias", f"{hf_attn}.q_proj.bias", f"{hf_attn}.k_proj.bias", f"{hf_attn}.v_proj.bias"))
    if qk_norm:
        out.append(Replicated(f"{attn}.q_layernorm.weight", f"{hf_attn}.q_norm.weight"))
        out.append(Replicated(f"{attn}.k_layernorm.weight", f"{hf_attn}.k_norm.weight"))
    return tuple(out)


def head_dim(hf: dict) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def rope_type(hf: dict) -> str:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return params.get("rope_type") or params.get("type") or "default"


SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def check_rope(hf: dict) -> str | None:
    kind = rope_type(hf)
    if kind not in SUPPORTED_ROPE_TYPES:
        return f"rope type '{kind}' is not supported yet (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    return None


def check_no_mlp_bias(hf: dict) -> str | None:
    if hf.get("mlp_bias"):
        return "mlp_bias: true is not supported (no released Llama/Qwen checkpoint uses it)"
    return None


def check_no_attention_bias(hf: dict) -> str | None:
    if hf.get("attention_bias"):
        return f"{hf.get('model_type')} with attention_bias: true (bias on o_proj too) is not supported"
    return None


def dense_transformer_kwargs(hf: dict, family: Family) -> dict:
    """Every HF config field that changes numerics, as Megatron TransformerConfig kwargs."""
    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        kv_channels=head_dim(hf),
        normalization="RMSNorm",
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias(hf),
        qk_layernorm=family.qk_layernorm,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        hidden_dropout=0.0,
        init_method_std=hf.get("initializer_range", 0.02),
    )

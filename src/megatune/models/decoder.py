"""Decoder-only families on Megatron's GPTModel (Llama, Qwen2/3, and their MoE variants).

A family file declares a `DecoderProvider`: its HF rotary class, mapping table, q/k norm, bias
rule, config checks and (for MoE) how routing translates. Everything that reads HF config keys
for these families is here or in `models/moe.py`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from megatune.models import moe
from megatune.models.mappings import FusedGateUp, FusedQKV, Mapping, Replicated, RowParallel, VocabParallel
from megatune.models.provider import ModelProvider


@dataclass(frozen=True)
class DecoderProvider(ModelProvider):
    """One supported HF `model_type` that maps onto Megatron's GPTModel."""

    model_type: str
    rotary_embedding: str  # import path of the HF rotary class, used to reproduce its inv_freq
    decoder_mappings: tuple[Mapping, ...]
    qk_layernorm: bool = False
    qkv_bias: Callable[[dict], bool] = lambda hf: False
    checks: tuple[Callable[[dict], str | None], ...] = field(default_factory=tuple)
    # MoE families: (HF config, run config) -> Megatron MoE kwargs; None for dense families
    moe_kwargs: Callable[[dict, object], dict] | None = None

    # -- what is supported ------------------------------------------------------------------

    def problems(self, hf: dict) -> list[str]:
        return [msg for check in self.checks if (msg := check(hf))]

    def is_moe(self, hf: dict) -> bool:
        return self.moe_kwargs is not None

    def layout_problems(self, hf: dict, parallel) -> list[str]:
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        vpp = parallel.virtual_pipeline_model_parallel_size or 1
        heads = hf["num_attention_heads"]
        groups = hf.get("num_key_value_heads") or heads
        layers = hf["num_hidden_layers"]
        problems = []
        if heads % tp:
            problems.append(f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tp}")
        if groups % tp:
            problems.append(
                f"num_key_value_heads={groups} (query groups) is not divisible by tensor_model_parallel_size={tp}"
            )
        if layers % (pp * vpp):
            problems.append(
                f"num_hidden_layers={layers} is not divisible by pipeline_model_parallel_size x "
                f"virtual_pipeline_model_parallel_size = {pp}x{vpp}"
            )
        ep = parallel.expert_model_parallel_size
        if self.is_moe(hf):
            experts = moe.num_experts(hf)
            if experts % ep:
                problems.append(f"num_experts={experts} is not divisible by expert_model_parallel_size={ep}")
            if tp > 1 and not parallel.sequence_parallel:
                problems.append(
                    "MoE models with tensor_model_parallel_size > 1 need sequence_parallel: true "
                    "(a Megatron-core requirement)"
                )
        elif ep > 1:
            problems.append(f"expert_model_parallel_size={ep} but the model has no experts")
        return problems

    def startup_notes(self, hf: dict, config) -> list[str]:
        from megatune.layers.vocab_padding import padding_note

        note = padding_note(self.vocab_size(hf), self.padded_vocab_size(hf, config.parallel),
                            config.parallel.tensor_model_parallel_size)
        notes = [note] if note else []
        if not self.is_moe(hf):
            return notes
        from megatune.layers.local_dispatch import dispatch_description
        from megatune.layers.spec import moe_experts_description
        from megatune.models.build import transformer_config

        return notes + [
            f"MoE experts: {moe_experts_description(config.parallel.moe_grouped_gemm)}",
            f"MoE token dispatch: {dispatch_description(transformer_config(config, hf, self))}",
            f"MoE routing: {moe.aux_loss_description(hf, config)}",
        ]

    # -- the Megatron model -----------------------------------------------------------------

    def transformer_kwargs(self, hf: dict, config) -> dict:
        """Every HF config field that changes numerics, as Megatron TransformerConfig kwargs."""
        kwargs = dict(
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
            add_qkv_bias=self.qkv_bias(hf),
            qk_layernorm=self.qk_layernorm,
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            hidden_dropout=0.0,
            init_method_std=hf.get("initializer_range", 0.02),
        )
        if self.is_moe(hf):
            p = config.parallel
            kwargs.update(
                self.moe_kwargs(hf, config),
                moe_expert_capacity_factor=p.moe_expert_capacity_factor,
                moe_token_drop_policy=p.moe_token_drop_policy,
                moe_pad_expert_input_to_capacity=p.moe_pad_expert_input_to_capacity,
            )
        return kwargs

    def build_chunk(self, tc, hf, hf_config, vp_stage, pre_process, post_process, padded_vocab_size):
        from megatron.core.models.gpt import GPTModel

        from megatune.layers.spec import decoder_spec

        model = GPTModel(
            config=tc,
            transformer_layer_spec=decoder_spec(tc, self.qk_layernorm, vp_stage),
            vocab_size=padded_vocab_size,
            max_sequence_length=hf.get("max_position_embeddings") or 4096,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=self.tied_embeddings(hf),
            position_embedding_type="rope",
            rotary_base=int(rope_theta(hf)),
            vp_stage=vp_stage,
        )
        inv_freq = hf_inv_freq(self.rotary_embedding, hf_config)
        model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
        return model

    def mappings(self, hf: dict, weight_names: set[str] | None = None) -> tuple[Mapping, ...]:
        return self.decoder_mappings

    def forward(self, model, batch, device, labels):
        from megatune.engine.forward import packed_seq_params

        return model(
            batch.tokens.to(device),
            batch.position_ids.to(device),
            None,
            labels=labels,
            packed_seq_params=packed_seq_params(batch, device),
            padding_mask=moe_padding_mask(batch, model, device),
        )

    # -- FLOPs ------------------------------------------------------------------------------

    def matmul_params(self, hf: dict) -> int:
        """Parameters that take part in a matmul per token, the output layer included (even
        when tied) with the real vocabulary (rows padded for tensor parallelism do no useful
        work and are not counted). MoE layers count the router and only the
        `num_experts_per_tok` experts a token is routed to (active parameters)."""
        h, heads = hf["hidden_size"], hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or heads
        d = head_dim(hf)
        attention = h * heads * d * 2 + h * kv * d * 2
        dense_mlp = 3 * h * hf["intermediate_size"]
        total = h * self.vocab_size(hf)
        if not self.is_moe(hf):
            return total + (attention + dense_mlp) * hf["num_hidden_layers"]
        routed = moe.active_expert_params(hf)
        for sparse in moe.moe_layer_freq(hf):
            total += attention + (routed if sparse else dense_mlp)
        return total

    def step_flops(self, hf: dict, doc_lens: list[int], image_grid_thw: list | None = None) -> float:
        """6 x matmul params x tokens + causal attention 6 x (heads x head_dim) x sum(len^2) x
        layers (QK^T and AV, 2 FLOPs per multiply-add, half the square by causality, x3 for
        forward + backward); see engine/metrics.py."""
        attention = 6 * hf["num_attention_heads"] * head_dim(hf) * sum(n * n for n in doc_lens)
        return 6.0 * self.matmul_params(hf) * sum(doc_lens) + attention * hf["num_hidden_layers"]


def moe_padding_mask(batch, model, device) -> torch.Tensor | None:
    """[b, s] True at padding, for the MoE routers, which leave those positions out of the
    load-balancing loss and its token counts (Megatron still dispatches them to experts).
    Megatron scatters the mask over sequence-parallel ranks only on the first pipeline stage;
    later stages get their slice from us."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model, get_model_config

    config = get_model_config(model)
    if not config.num_moe_experts or batch.padding_mask is None:
        return None
    mask = batch.padding_mask
    if config.sequence_parallel and not get_attr_wrapped_model(model, "pre_process"):
        mask = mask.chunk(ps.get_tensor_model_parallel_world_size(), dim=1)[ps.get_tensor_model_parallel_rank()]
    return mask.to(device)


def dense_decoder_mappings(qkv_bias: bool, qk_norm: bool, prefix: str = "model.", lm_head: str = "lm_head.weight",
                           megatron_prefix: str = "") -> tuple[Mapping, ...]:
    """Mappings of a Llama-style decoder onto Megatron's GPTModel. HF names sit under `prefix`
    (`model.` on disk for causal LMs; `model.language_model.` inside a vision-language model)
    and Megatron names under `megatron_prefix` (a wrapper's attribute holding the GPTModel)."""
    m, attn = megatron_prefix, f"{megatron_prefix}decoder.layers.{{layer}}.self_attention"
    hf_layer = f"{prefix}layers.{{layer}}"
    hf_attn = f"{hf_layer}.self_attn"
    out: list[Mapping] = [
        VocabParallel(f"{m}embedding.word_embeddings.weight", f"{prefix}embed_tokens.weight"),
        Replicated(f"{m}decoder.layers.{{layer}}.input_layernorm.weight", f"{hf_layer}.input_layernorm.weight"),
        FusedQKV(f"{attn}.linear_qkv.weight", f"{hf_attn}.q_proj.weight", f"{hf_attn}.k_proj.weight", f"{hf_attn}.v_proj.weight"),
        RowParallel(f"{attn}.linear_proj.weight", f"{hf_attn}.o_proj.weight"),
        Replicated(f"{m}decoder.layers.{{layer}}.pre_mlp_layernorm.weight", f"{hf_layer}.post_attention_layernorm.weight"),
        FusedGateUp(
            f"{m}decoder.layers.{{layer}}.mlp.linear_fc1.weight",
            f"{hf_layer}.mlp.gate_proj.weight",
            f"{hf_layer}.mlp.up_proj.weight",
        ),
        RowParallel(f"{m}decoder.layers.{{layer}}.mlp.linear_fc2.weight", f"{hf_layer}.mlp.down_proj.weight"),
        Replicated(f"{m}decoder.final_layernorm.weight", f"{prefix}norm.weight"),
        VocabParallel(f"{m}output_layer.weight", lm_head),
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


def hf_inv_freq(rotary_embedding: str, hf_config) -> torch.Tensor:
    """Rotary inverse frequencies computed by transformers itself (default, llama3, linear):
    `rotary_embedding` is the import path of the family's HF rotary class.

    Megatron's own llama3 scaling hard-codes the low/high frequency factors and the original
    context length; taking HF's tensor makes every scaling variant match by construction.
    Raises ValueError for variants that rescale attention (yarn, longrope)."""
    module_name, cls_name = rotary_embedding.rsplit(".", 1)
    rotary = getattr(importlib.import_module(module_name), cls_name)(config=hf_config)
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise ValueError("rope variants that rescale attention (e.g. yarn) are not supported yet")
    return rotary.inv_freq.detach().float().cpu()

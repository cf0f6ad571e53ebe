"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v biases) with routed experts
and a shared expert in each sparse layer.

Sparse layers: every `decoder_sparse_step`-th unless in `mlp_only_layers`; the others are dense
MLPs of `intermediate_size`. Routing renormalises the top-k probabilities only with
`norm_topk_prob` (False in Qwen1.5-MoE, hence Megatron's `moe_router_pre_softmax`). The shared
expert (`shared_expert_intermediate_size`) is added to the routed output scaled by
sigmoid(shared_expert_gate(x)): Megatron's SharedExpertMLP with `moe_shared_expert_gate`.
"""

from megatune.models import moe
from megatune.models.decoder import DecoderProvider, check_rope, dense_decoder_mappings


def check_no_sliding_window(hf: dict) -> str | None:
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        return "qwen2_moe with use_sliding_window: true is not supported (attention is full causal only)"
    return None


def moe_kwargs(hf: dict, config) -> dict:
    return moe.moe_kwargs(
        hf,
        config,
        expert_ffn=hf["moe_intermediate_size"],
        renormalise=bool(hf.get("norm_topk_prob", False)),
        shared_expert_ffn=hf.get("shared_expert_intermediate_size") or None,
        shared_expert_gate=True,
    )


PROVIDER = DecoderProvider(
    model_type="qwen2_moe",
    rotary_embedding="transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeRotaryEmbedding",
    decoder_mappings=dense_decoder_mappings(qkv_bias=True, qk_norm=False)
    + moe.QWEN_EXPERT_MAPPINGS
    + moe.shared_expert_mappings("model.layers.{layer}.mlp.shared_expert", "model.layers.{layer}.mlp.shared_expert_gate.weight"),
    qkv_bias=lambda hf: bool(hf.get("qkv_bias", True)),
    checks=(check_rope, check_no_sliding_window),
    moe_kwargs=moe_kwargs,
)

"""Qwen3-MoE: Qwen3 attention (q/k norms, head_dim) with a top-k softmax router over experts.

Routing in HF: softmax over all experts (fp32), top-k, then renormalise the k probabilities when
`norm_topk_prob`. Megatron's default order (top-k on the logits, softmax over those k) gives the
renormalised probabilities exactly; without `norm_topk_prob` it must softmax first
(`moe_router_pre_softmax`).
"""

from megatune.models.family import Family, check_no_attention_bias, check_rope, dense_decoder_mappings
from megatune.models.mappings import FusedGateUp, Replicated, RowParallel, StackedDown, StackedGateUp

_EXPERT = "decoder.layers.{layer}.mlp.experts.local_experts.{expert}"
_GROUPED = "decoder.layers.{layer}.mlp.experts"
_HF_EXPERT = "model.layers.{layer}.mlp.experts.{expert}"


def moe_layer_freq(hf: dict) -> list[int]:
    """HF: layer i is sparse unless listed in mlp_only_layers, and only every decoder_sparse_step-th."""
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(hf["num_hidden_layers"])]


def moe_kwargs(hf: dict, config) -> dict:
    coeff = config.parallel.moe_aux_loss_coeff
    return dict(
        num_moe_experts=hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 renamed it
        moe_router_topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_layer_freq=moe_layer_freq(hf),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0) if coeff is None else coeff,
        moe_router_dtype="fp32",
        moe_grouped_gemm=config.parallel.moe_grouped_gemm,  # GroupedExperts or SequentialMLP; layers/spec.py
        moe_permute_fusion=False,
    )


FAMILY = Family(
    model_type="qwen3_moe",
    rotary_embedding="transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeRotaryEmbedding",
    mappings=dense_decoder_mappings(qkv_bias=False, qk_norm=True)
    + (
        Replicated("decoder.layers.{layer}.mlp.router.weight", "model.layers.{layer}.mlp.gate.weight"),
        FusedGateUp(f"{_EXPERT}.linear_fc1.weight", f"{_HF_EXPERT}.gate_proj.weight", f"{_HF_EXPERT}.up_proj.weight"),
        RowParallel(f"{_EXPERT}.linear_fc2.weight", f"{_HF_EXPERT}.down_proj.weight"),
        # megatune GroupedExperts (moe_grouped_gemm: true): all local experts in one tensor
        StackedGateUp(f"{_GROUPED}.weight1", f"{_HF_EXPERT}.gate_proj.weight", f"{_HF_EXPERT}.up_proj.weight"),
        StackedDown(f"{_GROUPED}.weight2", f"{_HF_EXPERT}.down_proj.weight"),
    ),
    qk_layernorm=True,
    checks=(check_rope, check_no_attention_bias),
    moe_kwargs=moe_kwargs,
)

"""Qwen3-MoE: Qwen3 attention (q/k norms, head_dim) with a top-k softmax router over experts
(renormalised when `norm_topk_prob`; see models/moe.py)."""

from megatune.models import moe
from megatune.models.decoder import DecoderProvider, check_no_attention_bias, check_rope, dense_decoder_mappings

def moe_kwargs(hf: dict, config) -> dict:
    return moe.moe_kwargs(
        hf, config, expert_ffn=hf["moe_intermediate_size"], renormalise=bool(hf.get("norm_topk_prob", False))
    )


PROVIDER = DecoderProvider(
    model_type="qwen3_moe",
    rotary_embedding="transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeRotaryEmbedding",
    decoder_mappings=dense_decoder_mappings(qkv_bias=False, qk_norm=True)
    + moe.QWEN_EXPERT_MAPPINGS,
    qk_layernorm=True,
    checks=(check_rope, check_no_attention_bias),
    moe_kwargs=moe_kwargs,
)

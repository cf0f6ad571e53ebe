"""Qwen3 dense: RMSNorm on each query/key head, explicit head_dim, no q/k/v bias."""

from megatune.models.family import Family, check_rope, dense_decoder_mappings


def _check_attention_bias(hf: dict) -> str | None:
    if hf.get("attention_bias"):
        return "Qwen3 with attention_bias: true is not supported"
    return None


FAMILY = Family(
    model_type="qwen3",
    rotary_embedding="transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding",
    mappings=dense_decoder_mappings(qkv_bias=False, qk_norm=True),
    qk_layernorm=True,
    checks=(check_rope, _check_attention_bias),
)

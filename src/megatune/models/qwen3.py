"""Qwen3 dense: RMSNorm on each query/key head, explicit head_dim, no q/k/v bias."""

from megatune.models.family import Family, check_no_attention_bias, check_rope, dense_decoder_mappings


FAMILY = Family(
    model_type="qwen3",
    rotary_embedding="transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding",
    mappings=dense_decoder_mappings(qkv_bias=False, qk_norm=True),
    qk_layernorm=True,
    checks=(check_rope, check_no_attention_bias),
)

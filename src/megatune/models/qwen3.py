"""Qwen3 dense: RMSNorm on each query/key head, explicit head_dim, no q/k/v bias."""

from megatune.models.decoder import DecoderProvider, check_no_attention_bias, check_rope, dense_decoder_mappings


PROVIDER = DecoderProvider(
    model_type="qwen3",
    rotary_embedding="transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding",
    decoder_mappings=dense_decoder_mappings(qkv_bias=False, qk_norm=True),
    qk_layernorm=True,
    checks=(check_rope, check_no_attention_bias),
)

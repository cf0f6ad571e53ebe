"""Qwen2 / Qwen2.5: Llama layout plus biases on q/k/v."""

from megatune.models.decoder import DecoderProvider, check_rope, dense_decoder_mappings

PROVIDER = DecoderProvider(
    model_type="qwen2",
    rotary_embedding="transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding",
    decoder_mappings=dense_decoder_mappings(qkv_bias=True, qk_norm=False),
    qkv_bias=lambda hf: True,
    checks=(check_rope,),
)

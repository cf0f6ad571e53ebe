"""Qwen2 / Qwen2.5: Llama layout plus biases on q/k/v."""

from megatune.models.family import Family, check_rope, dense_decoder_mappings

FAMILY = Family(
    model_type="qwen2",
    rotary_embedding="transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding",
    mappings=dense_decoder_mappings(qkv_bias=True, qk_norm=False),
    qkv_bias=lambda hf: True,
    checks=(check_rope,),
)

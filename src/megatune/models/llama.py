"""Llama 2/3 (incl. llama3 rope scaling): HF `LlamaForCausalLM`."""

from megatune.models.decoder import DecoderProvider, check_no_attention_bias, check_no_mlp_bias, check_rope, dense_decoder_mappings


PROVIDER = DecoderProvider(
    model_type="llama",
    rotary_embedding="transformers.models.llama.modeling_llama.LlamaRotaryEmbedding",
    decoder_mappings=dense_decoder_mappings(qkv_bias=False, qk_norm=False),
    checks=(check_rope, check_no_mlp_bias, check_no_attention_bias),
)

"""Llama 2/3 (incl. llama3 rope scaling): HF `LlamaForCausalLM`."""

from megatune.models.family import Family, check_no_mlp_bias, check_rope, dense_decoder_mappings


def _check_attention_bias(hf: dict) -> str | None:
    if hf.get("attention_bias"):
        return "Llama with attention_bias: true (bias on o_proj too) is not supported"
    return None


FAMILY = Family(
    model_type="llama",
    rotary_embedding="transformers.models.llama.modeling_llama.LlamaRotaryEmbedding",
    mappings=dense_decoder_mappings(qkv_bias=False, qk_norm=False),
    checks=(check_rope, check_no_mlp_bias, _check_attention_bias),
)

"""Mixtral: Llama attention (no q/k norm, no bias) and a sparse MoE in every layer.

On disk (transformers 5 still writes the original layout): the router is
`model.layers.{L}.block_sparse_moe.gate.weight`, expert E's gate/up/down are
`block_sparse_moe.experts.{E}.w1/w3/w2.weight`. Routing always renormalises the top-k
probabilities, i.e. Megatron's default top-k-then-softmax (models/moe.py).
"""

from megatune.models import moe
from megatune.models.decoder import DecoderProvider, check_rope, dense_decoder_mappings


def check_no_sliding_window(hf: dict) -> str | None:
    if hf.get("sliding_window") is not None:
        return (
            f"mixtral with sliding_window: {hf['sliding_window']} is not supported (attention is full causal "
            "only); set it to null if your sequences never exceed the window"
        )
    return None


def check_no_router_jitter(hf: dict) -> str | None:
    if hf.get("router_jitter_noise"):
        return "mixtral with router_jitter_noise > 0 is not supported (released Mixtral checkpoints use 0.0)"
    return None


def moe_kwargs(hf: dict, config) -> dict:
    return moe.moe_kwargs(hf, config, expert_ffn=hf["intermediate_size"], renormalise=True)


PROVIDER = DecoderProvider(
    model_type="mixtral",
    rotary_embedding="transformers.models.mixtral.modeling_mixtral.MixtralRotaryEmbedding",
    decoder_mappings=dense_decoder_mappings(qkv_bias=False, qk_norm=False)
    + moe.expert_mappings(
        "model.layers.{layer}.block_sparse_moe.gate.weight",
        "model.layers.{layer}.block_sparse_moe.experts.{expert}",
        "w1",
        "w3",
        "w2",
    ),
    checks=(check_rope, check_no_sliding_window, check_no_router_jitter),
    moe_kwargs=moe_kwargs,
)

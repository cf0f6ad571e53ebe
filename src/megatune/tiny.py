"""Tiny random-weight HF checkpoints built offline from transformers config classes.

Used by the quick start and the tests: no hub access, a few hundred kB on disk.
"""

from __future__ import annotations

import torch

# A tiny Qwen3-MoE: 4 experts, top-2, layer 1 dense (mlp_only_layers), renormalised top-k.
TINY_MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    mlp_only_layers=[1],
    norm_topk_prob=True,
    head_dim=16,
)

# A tiny Mixtral: 4 experts (of intermediate_size), top-2, every layer sparse, full attention.
TINY_MIXTRAL = dict(
    num_local_experts=4,
    num_experts_per_tok=2,
    intermediate_size=48,
    sliding_window=None,
)

# A tiny Qwen2-MoE: 4 experts, top-2, no renormalisation (as Qwen1.5-MoE), a gated shared expert
# of its own width, layer 2 dense (mlp_only_layers).
TINY_QWEN2_MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[2],
)

TINY_PRESETS = {"qwen3_moe": TINY_MOE, "mixtral": TINY_MIXTRAL, "qwen2_moe": TINY_QWEN2_MOE}

TINY_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def make_tiny_model(model_type: str, out_dir: str, seed: int = 0, with_tokenizer: bool = False, **overrides) -> str:
    """Save a randomly initialised `model_type` causal LM (fp32 safetensors) into out_dir;
    `with_tokenizer` adds the offline tokenizer (and widens the vocabulary to hold it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatune.tiny_tokenizer import VOCAB_SIZE, make_tiny_tokenizer

    vocab = {"vocab_size": VOCAB_SIZE} if with_tokenizer else {}
    kwargs = {**TINY_SHAPE, **vocab, **TINY_PRESETS.get(model_type, {}), **overrides}
    if model_type == "qwen3":
        kwargs.setdefault("head_dim", 32)  # explicit head_dim != hidden/heads, as in real Qwen3
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random norm weights, so a mapping that mixes up norms cannot pass by accident.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
            elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                # MoE router: decisive routing, no near-ties; shared-expert gate: far from 0.5
                param.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    if with_tokenizer:
        make_tiny_tokenizer(out_dir, family="llama3" if model_type == "llama" else "qwen")
    return out_dir

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
    `with_tokenizer` adds the offline tokenizer (and widens the vocabulary to hold it).

    `qwen2_vl` / `qwen2_5_vl` give an image-text model instead (see `make_tiny_vl_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type in TINY_VISION:
        return make_tiny_vl_model(model_type, out_dir, seed=seed, with_tokenizer=with_tokenizer, **overrides)

    from megatune.tiny_tokenizer import VOCAB_SIZE, make_tiny_tokenizer

    vocab = {"vocab_size": VOCAB_SIZE} if with_tokenizer else {}
    kwargs = {**TINY_SHAPE, **vocab, **TINY_PRESETS.get(model_type, {}), **overrides}
    if model_type == "qwen3":
        kwargs.setdefault("head_dim", 32)  # explicit head_dim != hidden/heads, as in real Qwen3
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_for_tests(model)
    model.save_pretrained(out_dir)
    if with_tokenizer:
        make_tiny_tokenizer(out_dir, family="llama3" if model_type == "llama" else "qwen")
    return out_dir


def _randomise_for_tests(model: torch.nn.Module) -> None:
    """Random norm weights and biases, so a mapping that mixes them up cannot pass by accident."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(("ln_q.weight",)):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
            elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                # MoE router: decisive routing, no near-ties; shared-expert gate: far from 0.5
                param.normal_(0, 0.5)


# ---- vision-language (Qwen2-VL, Qwen2.5-VL) ---------------------------------------------------

# Tiny vision towers. Patch 14, temporal patch 2 and merge 2 are the real models' (the image
# processor and the M-RoPE grid depend on them); width and depth are cut down. Qwen2.5-VL's
# window_size is in pixels: 56 // (patch 14 * merge 2) = 2 merged tokens per window side, so an
# image of 3x5 merged tokens splits into 2x3 windows, some partial; block 0 attends within
# windows, block 1 (fullatt_block_indexes) across the whole image.
TINY_VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(
        depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2,
    ),
}
# M-RoPE channel split (temporal, height, width) of the rotary half-dimension: head_dim 16 -> 8.
TINY_MROPE_SECTION = [2, 3, 3]
# Small images for tests: at most 64 merged tokens (28x28 pixels each) per image.
TINY_IMAGE_PIXELS = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def tiny_vl_token_ids() -> dict[str, int]:
    """Ids of the vision special tokens (and bos/eos) in the offline "qwen" tokenizer.

    The BPE trainer gives special tokens the first ids, in list order, so the config's
    image_token_id etc. can be written without building the tokenizer; `make_tiny_vl_model`
    checks them against the saved tokenizer when it writes one.
    """
    from megatune.tiny_tokenizer import FAMILIES

    special = FAMILIES["qwen"]["special"]
    ids = {tok: special.index(tok) for tok in (*VISION_TOKENS, "<|endoftext|>", "<|im_end|>")}
    return dict(
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def make_tiny_vl_model(model_type: str, out_dir: str, seed: int = 0, with_tokenizer: bool = False, **overrides) -> str:
    """Save a random-weight `Qwen2VLForConditionalGeneration` (`qwen2_vl`) or
    `Qwen2_5_VLForConditionalGeneration` (`qwen2_5_vl`) in fp32, plus its image processor
    (`preprocessor_config.json`, loadable by `AutoImageProcessor` without torchvision).

    Text model: TINY_SHAPE with M-RoPE section TINY_MROPE_SECTION; vision tower: TINY_VISION.
    `overrides` update the text config (e.g. tie_word_embeddings=True goes to the top level).
    The vision token ids (image_token_id=11 etc.) are those of the offline tokenizer, written
    with `with_tokenizer` (vocabulary then widened to 512).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from megatune.tiny_tokenizer import VOCAB_SIZE, make_tiny_tokenizer

    if model_type not in TINY_VISION:
        raise ValueError(f"unknown vision-language model_type {model_type!r}; available: {sorted(TINY_VISION)}")
    ids = tiny_vl_token_ids()
    tie = overrides.pop("tie_word_embeddings", False)
    text = {
        **TINY_SHAPE,
        **({"vocab_size": VOCAB_SIZE} if with_tokenizer else {}),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(TINY_MROPE_SECTION)},
        **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        # Wider than the default 0.02 so attention is far from uniform: then a position error
        # (e.g. a wrong M-RoPE section) moves the logits by ~0.1, not ~1e-4.
        "initializer_range": 0.1,
        **overrides,
    }
    vision = {**TINY_VISION[model_type]}
    # The merger projects onto the language model's width.
    vision["out_hidden_size" if model_type == "qwen2_5_vl" else "hidden_size"] = text["hidden_size"]
    config = AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tie,
        **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")},
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    _randomise_for_tests(model)
    model.save_pretrained(out_dir)
    merge = vision["spatial_merge_size"]
    Qwen2VLImageProcessorPil(
        patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"], merge_size=merge, **TINY_IMAGE_PIXELS
    ).save_pretrained(out_dir)
    if with_tokenizer:
        tok = make_tiny_tokenizer(out_dir, family="qwen")
        for name, key in zip(VISION_TOKENS, ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")):
            if tok.convert_tokens_to_ids(name) != ids[key]:
                raise AssertionError(f"tiny tokenizer gives {name} id {tok.convert_tokens_to_ids(name)}, config says {ids[key]}")
    return out_dir

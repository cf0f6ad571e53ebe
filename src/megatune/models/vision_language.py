"""Qwen2-VL / Qwen2.5-VL on Megatron: a GPTModel language model with the vision tower in front.

Model. `VisionLanguageModel` *is* a Megatron `GPTModel` (M-RoPE, `mrope_section` from the HF
config) that additionally holds, on the first pipeline stage only, transformers' own vision
module (`Qwen2VisionTransformerPretrainedModel` / `Qwen2_5_VisionTransformerPretrainedModel`:
patch embedding, vision blocks, and the patch merger = the multimodal projector) as
`vision_model`. Being a GPTModel subclass keeps every name Megatron and megatune already rely
on: `decoder.layers.<i>` for the layer-index rewrite in `models/weights.py`, and `pre_process`,
`post_process`, `share_embeddings_and_output_weights`, `shared_embedding_or_output_weight`,
`set_input_tensor`, `decoder`, `sharded_state_dict` for the schedules, DDP's gradient
finalisation and dist-checkpointing (which saves the vision tower as replicated tensors).

Why the tower is replicated on every tensor-parallel rank instead of split: it is small (~0.67B
of Qwen2-VL-7B's 8.3B parameters; its width 1280 would give thin per-rank matmuls), its
per-image / windowed attention has no Megatron counterpart, and running transformers' module
unchanged makes its numerics equal to transformers' by construction. The cost: every TP rank
computes the whole tower (its FLOPs are not divided by tp). Every TP rank
computes the same features from the same pixels; the gradients reaching them are identical too
(the decoder's first column-parallel linear all-reduces its input gradient, and with sequence
parallelism the scatter's backward all-gathers), so no extra reduction is needed. The tower's
parameters carry no `tensor_model_parallel` flag, so Megatron's grad-norm counts them once.

Forward on the first stage: word embeddings (Megatron's, vocab-parallel, built without the
sequence-parallel scatter) -> features of all images -> written into the `<|image_pad|>`
positions in row-major order (transformers' `masked_scatter` order) -> scattered to the
sequence-parallel ranks -> `GPTModel.forward(decoder_input=...)`. Later stages receive hidden
states through `set_input_tensor` as for any GPTModel; every stage needs the M-RoPE
`position_ids` [3, b, s] (`models/mrope.py`).

Weights. `qwen2_vl_mappings(model_type, layout)` lists the mappings for both on-disk layouts:
"published" (`visual.*`, `model.layers.*`, `model.embed_tokens`, `model.norm`, `lm_head`; what
published checkpoints and transformers 5.24's `save_pretrained` write) and "nested"
(`model.visual.*`, `model.language_model.*`, `lm_head`). `detect_layout` tells them apart.
"""

from __future__ import annotations

import importlib
from typing import Iterable, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from transformers import PretrainedConfig

from megatune.models.decoder import dense_decoder_mappings, hf_inv_freq
from megatune.models.mappings import Mapping, Replicated

VISION_MODULE = "vision_model"  # attribute (and Megatron-name prefix) of the vision tower
PROJECTOR_MODULE = f"{VISION_MODULE}.merger"  # the patch merger = LLaMA-Factory's "multi_modal_projector"

# Per family: the transformers vision class, the text rotary class (for its inv_freq), and the
# vision tower's parameter names relative to the tower (`{layer}` = vision block index).
_VISION_CLASSES = {
    "qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel",
    "qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel",
}
_TEXT_ROTARY = {
    "qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VLRotaryEmbedding",
    "qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLRotaryEmbedding",
}
_WB = ("weight", "bias")
_VISION_PARAMS = {
    # LayerNorm blocks, MLP fc1 -> quick_gelu -> fc2; merger LayerNorm + 2-layer MLP.
    "qwen2_vl": (
        "patch_embed.proj.weight",
        *(f"blocks.{{layer}}.{m}.{p}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2") for p in _WB),
        *(f"merger.{m}.{p}" for m in ("ln_q", "mlp.0", "mlp.2") for p in _WB),
    ),
    # RMSNorm blocks (no bias), gated MLP with biases; merger RMSNorm + 2-layer MLP.
    "qwen2_5_vl": (
        "patch_embed.proj.weight",
        "blocks.{layer}.norm1.weight",
        "blocks.{layer}.norm2.weight",
        *(f"blocks.{{layer}}.{m}.{p}" for m in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") for p in _WB),
        "merger.ln_q.weight",
        *(f"merger.{m}.{p}" for m in ("mlp.0", "mlp.2") for p in _WB),
    ),
}

LAYOUTS = {
    # layout: (vision tower prefix, language-model prefix replacing "model.")
    "published": ("visual.", "model."),
    "nested": ("model.visual.", "model.language_model."),
}


# ---- weight mappings ----------------------------------------------------------------------------


def qwen2_vl_mappings(model_type: str, layout: str) -> tuple[Mapping, ...]:
    """Mappings of a Qwen2-VL (`model_type="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`)
    checkpoint in `layout` ("published" or "nested", see `detect_layout`) onto
    `VisionLanguageModel`: the Qwen2 decoder (fused QKV with biases, fused gate/up; TP-sharded)
    and the vision tower + merger, replicated, under `vision_model.*`.

    Raises ValueError for an unknown model_type or layout."""
    if model_type not in _VISION_PARAMS:
        raise ValueError(f"no vision-language mappings for model_type {model_type!r}; supported: {sorted(_VISION_PARAMS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    vision_prefix, text_prefix = LAYOUTS[layout]
    text = dense_decoder_mappings(qkv_bias=True, qk_norm=False, prefix=text_prefix)
    vision = tuple(Replicated(f"{VISION_MODULE}.{name}", vision_prefix + name) for name in _VISION_PARAMS[model_type])
    return text + vision


def detect_layout(weight_names: Iterable[str], where: str = "checkpoint") -> str:
    """"published" (`visual.*`, `model.layers.*`, `model.embed_tokens.*`) or "nested"
    (`model.visual.*`, `model.language_model.*`) from a checkpoint's tensor names.

    Raises ValueError (naming `where`) when the names match neither or mix both."""
    nested = published = False
    for name in weight_names:
        if name.startswith(("model.language_model.", "model.visual.")):
            nested = True
        elif name.startswith(("visual.", "model.layers.", "model.embed_tokens.", "model.norm.")):
            published = True
    if nested and published:
        raise ValueError(
            f"{where}: tensor names mix the published layout (visual.*, model.layers.*) and the nested one "
            "(model.visual.*, model.language_model.*); re-save the checkpoint with transformers"
        )
    if not (nested or published):
        raise ValueError(
            f"{where}: no Qwen2-VL tensors found (expected visual.* and model.layers.*, or model.visual.* "
            "and model.language_model.*)"
        )
    return "nested" if nested else "published"


def param_group(megatron_name: str) -> str:
    """Which LLaMA-Factory freeze switch a parameter falls under: "vision_tower"
    (`freeze_vision_tower`), "multi_modal_projector" (`freeze_multi_modal_projector`) or
    "language_model" (`freeze_language_model`)."""
    if megatron_name.startswith(PROJECTOR_MODULE + "."):
        return "multi_modal_projector"
    if megatron_name.startswith(VISION_MODULE + "."):
        return "vision_tower"
    return "language_model"


# ---- configuration ------------------------------------------------------------------------------


def text_inv_freq(hf_config: PretrainedConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] as transformers' text rotary class computes them."""
    return hf_inv_freq(_TEXT_ROTARY[hf_config.model_type], hf_config.text_config)

def build_vision_tower(hf_config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' vision module (tower + merger) of `hf_config.model_type`, random weights in
    `dtype`, SDPA attention; the caller loads the checkpoint's weights into it."""
    module_name, cls_name = _VISION_CLASSES[hf_config.model_type].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls._from_config(hf_config.vision_config, dtype=dtype, attn_implementation="sdpa")


# ---- the model ----------------------------------------------------------------------------------


class VisionLanguageModel(GPTModel):
    """Megatron GPTModel (position_embedding_type="mrope") plus, when `pre_process`, the HF
    vision tower as `self.vision_model` (see the module docstring for why it is replicated).

    Args (beyond GPTModel's, which are passed through; position_embedding_type and
    scatter_embedding_sequence_parallel are fixed here):
        hf_config: the HF `Qwen2VLConfig` / `Qwen2_5_VLConfig` (vision config and token ids).
        config: must carry `mrope_section` (models/qwen2_vl.py:mrope_section).
    """

    def __init__(self, config: TransformerConfig, hf_config: PretrainedConfig, **gpt_kwargs):
        if config.mrope_section is None:
            raise ValueError("TransformerConfig.mrope_section must be set for a vision-language model")
        # Megatron would scatter the embeddings to sequence-parallel ranks before we can insert
        # the image features; we scatter ourselves afterwards.
        super().__init__(
            config=config, position_embedding_type="mrope", scatter_embedding_sequence_parallel=False, **gpt_kwargs
        )
        self.image_token_id = int(hf_config.image_token_id)
        self.video_token_id = int(hf_config.video_token_id)
        self.spatial_merge_size = int(hf_config.vision_config.spatial_merge_size)
        self.vision_model = build_vision_tower(hf_config, config.params_dtype) if self.pre_process else None

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged image features [sum_i t_i*h_i*w_i / merge^2, hidden] (the language model's
        width) from pixel_values [num_patches, C*T*P*P] and image_grid_thw [num_images, 3]."""
        out = self.vision_model(pixel_values.to(self.config.params_dtype), grid_thw=image_grid_thw)
        # transformers >= 5.2x returns an output object (merged features as pooler_output);
        # earlier 5.x releases return the merged features themselves
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Decoder input [s, b, hidden] (sequence-parallel: [s / tp, b, hidden]) for input_ids
        [b, s]: token embeddings with the image features in the image-token positions.

        Raises ValueError when the number of image tokens differs from the image features'
        count, or image tokens come without pixel_values; NotImplementedError on video tokens."""
        embeddings = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h], replicated over TP
        image_mask = input_ids == self.image_token_id
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            features = self.image_features(pixel_values, image_grid_thw)
            count = int(image_mask.sum())
            if count != features.shape[0]:
                raise ValueError(
                    f"the micro-batch has {count} image tokens but its {image_grid_thw.shape[0]} images give "
                    f"{features.shape[0]} features; every image needs t*h*w/merge^2 <|image_pad|> tokens"
                )
            # Row-major over [b, s], the order transformers fills them in.
            embeddings = (
                embeddings.transpose(0, 1)
                .masked_scatter(image_mask.unsqueeze(-1), features.to(embeddings.dtype))
                .transpose(0, 1)
                .contiguous()
            )
        elif bool(image_mask.any()):
            raise ValueError("the micro-batch has image tokens but no pixel_values")
        elif self._needs_vision_grads():
            # A text-only micro-batch while training the tower: run one blank image through it
            # and add 0 x its features, so every tower parameter still gets a (zero) gradient.
            # Megatron DDP with overlap_grad_reduce launches a bucket's reduction only when all
            # its parameters have reported a gradient; an untouched tower would stall it.
            embeddings = embeddings + 0.0 * self._blank_image_features(embeddings.device).sum()
        if bool((input_ids == self.video_token_id).any()):
            raise NotImplementedError("video inputs are not supported yet")
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            if self.config.clone_scatter_output_in_embedding:
                # As Megatron's embedding does: the scatter returns a view of the full tensor.
                embeddings = embeddings.clone()
        return embeddings

    def _needs_vision_grads(self) -> bool:
        return self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_model.parameters())

    def _blank_image_features(self, device: torch.device) -> torch.Tensor:
        c = self.vision_model.config
        merge = c.spatial_merge_size
        patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size
        pixels = torch.zeros(merge * merge, patch_dim, device=device)
        grid = torch.tensor([[1, merge, merge]], device=device)
        return self.image_features(pixels, grid)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        decoder_input: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        **kwargs,
    ) -> torch.Tensor:
        """Logits [b, s, vocab / tp] (or per-token losses [b, s] with labels) on the last stage,
        hidden states [s (/ tp with SP), b, hidden] elsewhere, as GPTModel.forward.

        Args:
            input_ids: [b, s] token ids (used on the first stage; image tokens included).
            position_ids: [3, b, s] M-RoPE ids (`models/mrope.py`), needed on every stage.
            attention_mask: as GPTModel (None = causal).
            pixel_values: [num_patches, C*T*P*P] of all images of the micro-batch (first stage).
            image_grid_thw: [num_images, 3] LongTensor, images in row-major order.
            packed_seq_params: "thd" packing; position_ids then [3, 1, total] restarting per document.
        """
        if position_ids is None or position_ids.dim() != 3 or position_ids.shape[0] != 3:
            shape = None if position_ids is None else tuple(position_ids.shape)
            raise ValueError(f"M-RoPE needs position_ids of shape [3, batch, seq]; got {shape}")
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw)
        return super().forward(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )


def build_vision_language_model(
    config: TransformerConfig,
    hf_config: PretrainedConfig,
    layer_spec,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: Optional[int] = None,
    padded_vocab_size: Optional[int] = None,
) -> VisionLanguageModel:
    """One model chunk with transformers' rotary frequencies (models/build.py sets the TP flags).

    `config` is the language model's TransformerConfig with `mrope_section` (see
    `models/qwen2_vl.py`); `layer_spec` the decoder spec of this stage
    (`layers/spec.py:decoder_spec(config, False, vp_stage)`); `padded_vocab_size`: rows of the
    embedding / output layer (layers/vocab_padding.py; None: the text config's vocab_size)."""
    text = hf_config.text_config
    model = VisionLanguageModel(
        config,
        hf_config,
        transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size or text.vocab_size,
        max_sequence_length=text.max_position_embeddings or 4096,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        rotary_base=int((text.rope_parameters or {}).get("rope_theta", 10000.0)),
        vp_stage=vp_stage,
    )
    model.rotary_pos_emb.inv_freq = text_inv_freq(hf_config).to(model.rotary_pos_emb.inv_freq.device)
    return model


# ---- FLOPs --------------------------------------------------------------------------------------


def vision_flops(vision_config: PretrainedConfig, image_grid_thw: Iterable[Iterable[int]], model_type: str) -> float:
    """Training FLOPs (forward + backward) of the vision tower and merger for a set of images.

    Formula (the convention of the language model's count, DESIGN.md section 4):
    6 x (matmul parameters touched per patch) x patches + 6 x (merger matmul parameters) x
    merged tokens + attention, where a block's attention costs 3 (fwd+bwd) x 2 matmuls
    (scores, context) x 2 FLOPs per multiply-add x L^2 x width = 12 L^2 width for every
    attention span of L patches: one span per image frame in full-attention blocks, one per window in
    Qwen2.5-VL's windowed blocks. Norms, biases, activations and rotary are not counted.

    Args:
        vision_config: the HF vision config (`hf_config.vision_config`).
        image_grid_thw: (t, h, w) per image, in patches.
        model_type: "qwen2_vl" or "qwen2_5_vl".
    Returns: FLOPs (float).
    """
    c = vision_config
    merge, patch = c.spatial_merge_size, c.patch_size
    if model_type == "qwen2_vl":
        width, out = c.embed_dim, c.hidden_size
        mlp = 2 * width * int(width * c.mlp_ratio)
        windowed: set[int] = set()
    elif model_type == "qwen2_5_vl":
        width, out = c.hidden_size, c.out_hidden_size
        mlp = 3 * width * c.intermediate_size
        windowed = set(range(c.depth)) - set(c.fullatt_block_indexes)
    else:
        raise ValueError(f"unknown vision-language model_type {model_type!r}")
    patch_embed = c.in_channels * c.temporal_patch_size * patch * patch * width
    block = 3 * width * width + width * width + mlp  # qkv, proj, MLP
    merged_width = width * merge * merge
    merger = merged_width * merged_width + merged_width * out

    total = 0.0
    for t, h, w in ((int(a) for a in g) for g in image_grid_thw):
        patches = t * h * w
        total += 6.0 * (patch_embed + c.depth * block) * patches + 6.0 * merger * patches / (merge * merge)
        full_span = float(t) * (h * w) ** 2  # one span per frame (transformers' cu_seqlens)
        if windowed:
            # Windows of `side` merged tokens per side tile the merged grid; the last row/column
            # of windows may be partial. Sum of L^2 over windows = t * m^4 * (sum r_i^2)(sum c_j^2).
            side = c.window_size // merge // patch
            rows = _window_sides(h // merge, side)
            cols = _window_sides(w // merge, side)
            window_span = t * merge**4 * sum(r * r for r in rows) * sum(k * k for k in cols)
        else:
            window_span = full_span
        for b in range(c.depth):
            total += 12.0 * width * (window_span if b in windowed else full_span)
    return total


def _window_sides(length: int, side: int) -> list[int]:
    return [min(side, length - start) for start in range(0, length, side)]

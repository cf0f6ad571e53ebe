"""Qwen2-VL and Qwen2.5-VL (HF `Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`): a Qwen2 decoder with M-RoPE on Megatron, transformers'
vision tower + merger in front of it on the first pipeline stage (models/vision_language.py).

The HF config nests the language model under `text_config`; this provider hands that dict
(with the top-level `tie_word_embeddings` and `model_type`) to the decoder logic it inherits,
and adds what is vision-specific: `mrope_section`, the chunk class, the mappings of the
checkpoint's on-disk layout, the M-RoPE positions and image inputs of the forward, the vision
tower's FLOPs and LLaMA-Factory's freeze switches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatune.models.decoder import DecoderProvider, check_no_mlp_bias, head_dim
from megatune.models.mappings import Mapping
from megatune.models.mrope import image_token_count, mrope_position_ids

FREEZE_KEYS = ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model")


def text_config(hf: dict) -> dict:
    """The language model's config dict, as a text-only checkpoint would have it (published
    Qwen2-VL config.json files keep the text fields at the top level, newer ones nest them)."""
    text = hf.get("text_config") or hf
    return {**text, "tie_word_embeddings": bool(hf.get("tie_word_embeddings")), "model_type": hf["model_type"]}


@dataclass(frozen=True)
class VisionLanguageProvider(DecoderProvider):
    accepts_images: bool = True

    def problems(self, hf: dict) -> list[str]:
        text = text_config(hf)
        problems = []
        params = text.get("rope_parameters") or {}
        if (params.get("rope_type") or "default") not in ("default", "mrope"):
            problems.append(f"text rope type '{params.get('rope_type')}' is not supported for vision-language models")
        if text.get("use_sliding_window"):
            problems.append("use_sliding_window: true is not supported (attention is full causal only)")
        if msg := check_no_mlp_bias(text):
            problems.append(msg)
        section = mrope_section(hf)
        if sum(section) != head_dim(text) // 2:
            problems.append(f"mrope_section {section} sums to {sum(section)}, but head_dim / 2 is {head_dim(text) // 2}")
        return problems

    def layout_problems(self, hf: dict, parallel) -> list[str]:
        return super().layout_problems(text_config(hf), parallel)

    def vocab_size(self, hf: dict) -> int:
        return text_config(hf)["vocab_size"]

    def transformer_kwargs(self, hf: dict, config) -> dict:
        return {**super().transformer_kwargs(text_config(hf), config), "mrope_section": mrope_section(hf)}

    def startup_notes(self, hf: dict, config) -> list[str]:
        frozen = [k for k in FREEZE_KEYS if getattr(config.training, k)]
        return super().startup_notes(hf, config) + [  # the vocabulary padding line, if any
            "vision tower: transformers' module on the first pipeline stage, replicated over tensor-parallel ranks"
            + (f"; frozen: {', '.join(frozen)}" if frozen else "")
        ]

    def build_chunk(self, tc, hf, hf_config, vp_stage, pre_process, post_process, padded_vocab_size):
        from megatune.layers.spec import decoder_spec
        from megatune.models.vision_language import build_vision_language_model

        return build_vision_language_model(tc, hf_config, decoder_spec(tc, False, vp_stage),
                                           pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                                           padded_vocab_size=padded_vocab_size)

    def mappings(self, hf: dict, weight_names: set[str] | None = None) -> tuple[Mapping, ...]:
        """The table of the checkpoint's layout ("published" or "nested"; see
        vision_language.detect_layout); "published" when the names are unknown."""
        from megatune.models.vision_language import detect_layout, qwen2_vl_mappings

        layout = detect_layout(weight_names) if weight_names else "published"
        return qwen2_vl_mappings(self.model_type, layout)

    def forward(self, model, batch, device, labels):
        from megatron.core.utils import get_attr_wrapped_model

        from megatune.engine.forward import packed_seq_params

        pixel_values, grids = batch.extras.get("pixel_values"), batch.extras.get("image_grid_thw")
        has_images = grids is not None and len(grids) > 0
        return model(
            batch.tokens.to(device),
            mrope_positions(batch, grids, get_attr_wrapped_model(model, "image_token_id"),
                            get_attr_wrapped_model(model, "spatial_merge_size")).to(device),
            None,
            labels=labels,
            pixel_values=pixel_values.to(device) if has_images else None,
            image_grid_thw=grids.to(device) if has_images else None,
            packed_seq_params=packed_seq_params(batch, device),
        )

    def verify_inputs(self, model_dir: str, hf: dict, batch: int, seq_len: int, seed: int):
        """Each row: random text tokens with one synthetic image (seeded random pixels, 56 x 84,
        through the model folder's image processor) in its vision block, 4 tokens in."""
        from megatune.data.collator import Batch
        from megatune.data.images import load_image_processor
        from megatune.data.processors import IGNORE
        from PIL import Image

        gen = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (56, 84, 3), generator=gen, dtype=torch.uint8).numpy()
        processed = load_image_processor(model_dir)(images=[Image.fromarray(pixels)] * batch, return_tensors="pt")
        grids = processed["image_grid_thw"]
        merge = hf["vision_config"]["spatial_merge_size"]
        image_id, start, end = hf["image_token_id"], hf["vision_start_token_id"], hf["vision_end_token_id"]
        block = [start] + [image_id] * image_token_count(grids[0].tolist(), merge) + [end]
        specials = {image_id, start, end, hf["video_token_id"]}
        text = torch.randint(0, self.vocab_size(hf), (batch, seq_len + 16), generator=gen)
        rows = []
        for r in range(batch):
            words = [t for t in text[r].tolist() if t not in specials][:seq_len]
            rows.append(words[:4] + block + words[4:])
        tokens = torch.tensor(rows)
        ours = Batch(tokens, torch.full_like(tokens, IGNORE), torch.zeros_like(tokens),
                     extras={"pixel_values": processed["pixel_values"], "image_grid_thw": grids})
        hf_inputs = {"input_ids": tokens, "pixel_values": processed["pixel_values"], "image_grid_thw": grids}
        import inspect

        from transformers import Qwen2VLForConditionalGeneration

        if "mm_token_type_ids" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters:
            hf_inputs["mm_token_type_ids"] = (tokens == image_id).int()  # transformers >= 5.2x needs it for M-RoPE
        return ours, hf_inputs, "AutoModelForImageTextToText"

    def freeze(self, chunks, config) -> int:
        """LLaMA-Factory's freeze switches: parameters of the frozen parts stop requiring
        gradients (so Megatron's DDP and optimizer leave them out) and are exported as loaded.
        Returns how many parameters were frozen."""
        from megatune.models.vision_language import param_group
        from megatune.models.weights import global_params

        frozen_groups = {k.removeprefix("freeze_") for k in FREEZE_KEYS if getattr(config.training, k)}
        count = 0
        for chunk in chunks:
            for name, param in global_params(chunk):
                if param_group(name) in frozen_groups:
                    param.requires_grad_(False)
                    count += 1
        return count

    def step_flops(self, hf: dict, doc_lens: list[int], image_grid_thw=None) -> float:
        """The language model's FLOPs (decoder formula over the text config) plus the vision
        tower's for the step's images (vision_language.vision_flops)."""
        from types import SimpleNamespace

        flops = super().step_flops(text_config(hf), doc_lens)
        if image_grid_thw:
            from megatune.models.vision_language import vision_flops

            flops += vision_flops(SimpleNamespace(**hf["vision_config"]), image_grid_thw, hf["model_type"])
        return flops

    def matmul_params(self, hf: dict) -> int:
        return super().matmul_params(text_config(hf))


def mrope_section(hf: dict) -> list[int]:
    """The text config's `mrope_section` (rotary half-dims for temporal, height, width);
    transformers' default [16, 24, 24] when absent."""
    text = text_config(hf)
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return [int(x) for x in params.get("mrope_section", [16, 24, 24])]


def mrope_positions(batch, grids, image_token_id: int, merge: int) -> torch.Tensor:
    """M-RoPE position ids [3, b, s] of a collated micro-batch (models/mrope.py per row; packed
    rows restart at each document). `grids` [n, 3]: the micro-batch's images in row-major order."""
    grids = [] if grids is None else [tuple(int(x) for x in g) for g in grids.tolist()]
    doc_lens = None
    if batch.cu_seqlens is not None:
        doc_lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    rows, used = [], 0
    for r in range(batch.tokens.shape[0]):
        ids = batch.tokens[r].tolist()
        needed, take = sum(1 for t in ids if t == image_token_id), []
        while needed > 0 and used < len(grids):
            take.append(grids[used])
            needed -= image_token_count(grids[used], merge)
            used += 1
        rows.append(mrope_position_ids(ids, take, spatial_merge_size=merge, image_token_id=image_token_id,
                                       document_lengths=doc_lens, where=f"micro-batch row {r}"))
    return torch.stack(rows, dim=1)


QWEN2_VL = VisionLanguageProvider(
    model_type="qwen2_vl",
    rotary_embedding="transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VLRotaryEmbedding",
    decoder_mappings=(),  # the mappings depend on the checkpoint's layout: see `mappings`
    qkv_bias=lambda hf: True,
)
QWEN2_5_VL = VisionLanguageProvider(
    model_type="qwen2_5_vl",
    rotary_embedding="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLRotaryEmbedding",
    decoder_mappings=(),
    qkv_bias=lambda hf: True,
)

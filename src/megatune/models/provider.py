"""What a model family provides to the rest of megatune: the one seam between HF and the engine.

A provider answers every question that needs the Hugging Face config (`hf`, the dict of
`config.json` with transformers' class defaults filled in): whether the checkpoint is supported,
which layouts fit it, its Megatron `TransformerConfig` fields, how to build the model chunk of a
pipeline (and virtual pipeline) stage, its weight mappings, how one micro-batch goes through a
chunk, and its model FLOPs. Nothing outside `models/` reads HF config keys.

`models/decoder.py:DecoderProvider` implements it for Megatron's GPTModel (dense and MoE
decoders); a family with another model (e.g. a vision tower in front of the decoder) subclasses
it and overrides what differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from megatune.models.mappings import Mapping


class UnsupportedModelError(ValueError):
    """The checkpoint's config asks for something this family cannot run; the message says what."""


class ModelProvider(ABC):
    """The interface the engine, metrics, CLI and config validation use (see module docstring)."""

    model_type: str
    accepts_images: bool = False  # has a vision tower: image rows are encoded, not refused

    @abstractmethod
    def problems(self, hf: dict) -> list[str]:
        """Unsupported variants of the HF config, one message each (empty when supported)."""

    @abstractmethod
    def layout_problems(self, hf: dict, parallel) -> list[str]:
        """What does not divide under `parallel` (config.ParallelSection): heads by TP, layers by
        PP x VPP, experts by EP, ...; one message each."""

    @abstractmethod
    def is_moe(self, hf: dict) -> bool:
        """True when the model has routed experts (the one place this is decided)."""

    @abstractmethod
    def transformer_kwargs(self, hf: dict, config) -> dict:
        """Megatron `TransformerConfig` fields that come from the checkpoint (numerics, MoE)."""

    @abstractmethod
    def build_chunk(self, tc, hf: dict, hf_config, vp_stage: int | None, pre_process: bool,
                    post_process: bool, padded_vocab_size: int) -> torch.nn.Module:
        """The model chunk of this rank's pipeline stage (`vp_stage`: virtual stage or None),
        its embedding and output layer `padded_vocab_size` rows (see `padded_vocab_size`)."""

    @abstractmethod
    def mappings(self, hf: dict, weight_names: set[str] | None = None) -> tuple[Mapping, ...]:
        """Megatron name <-> HF tensor mappings. `weight_names` (the checkpoint's tensor names,
        when known) lets a family pick between on-disk layouts."""

    @abstractmethod
    def forward(self, model, batch, device: torch.device, labels: torch.Tensor | None) -> torch.Tensor:
        """Run one collated micro-batch (`data.collator.Batch`) through a model chunk. With
        `labels` [b, s] (next-token ids, no IGNORE) the last stage returns per-token
        cross-entropy [b, s]; without, logits [b, s, v/tp]; other stages return hidden states."""

    @abstractmethod
    def step_flops(self, hf: dict, doc_lens: list[int], image_grid_thw: list | None = None) -> float:
        """Model FLOPs of a forward + backward pass over documents of these lengths (and, for a
        vision-language model, images of these (t, h, w) patch grids)."""

    def verify_inputs(self, model_dir: str, hf: dict, batch: int, seq_len: int, seed: int):
        """`megatune verify`'s fixed pseudo-random inputs, the same on every rank: (a collated
        `data.collator.Batch` for this provider's `forward`, the keyword arguments of the same
        inputs for transformers' model, the transformers Auto class that loads it)."""
        from megatune.data.collator import Batch
        from megatune.data.processors import IGNORE

        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.vocab_size(hf), (batch, seq_len), generator=gen)
        positions = torch.arange(seq_len).unsqueeze(0).expand(batch, -1)
        return Batch(tokens, torch.full_like(tokens, IGNORE), positions), {"input_ids": tokens}, "AutoModelForCausalLM"

    def vocab_size(self, hf: dict) -> int:
        """The HF vocabulary: rows of embed_tokens / lm_head, the logits compared and trained."""
        return hf["vocab_size"]

    def padded_vocab_size(self, hf: dict, parallel) -> int:
        """Rows of the Megatron embedding / output layer under `parallel` (config.ParallelSection):
        the vocabulary padded for tensor parallelism (layers/vocab_padding.py)."""
        from megatune.layers.vocab_padding import padded_vocab_size

        return padded_vocab_size(self.vocab_size(hf), parallel.tensor_model_parallel_size,
                                 parallel.make_vocab_size_divisible_by)

    def tied_embeddings(self, hf: dict) -> bool:
        return bool(hf.get("tie_word_embeddings"))

    def freeze(self, chunks, config) -> int:
        """Stop gradients to the parts the run config freezes; returns the number of tensors
        frozen (families without freezable parts have none: config validation refuses the keys)."""
        return 0

    def startup_notes(self, hf: dict, config) -> list[str]:
        """Lines printed once at start-up about how this model will run (e.g. the MoE path)."""
        return []

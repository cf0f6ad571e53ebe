"""Batch samples into model inputs; the one place labels are shifted to next-token targets.

Padding goes to a multiple of `pad_multiple` (tp under sequence parallelism, 2*cp under context
parallelism: `pad_multiple_for`). Packed micro-batches become one "thd" row with cu_seqlens, the
form Megatron's PackedSeqParams takes; padding there is a document of its own, fully masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from megatune.data.processors import IGNORE, Sample


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s] next-token targets, IGNORE where no loss
    position_ids: torch.Tensor  # [b, s]
    cu_seqlens: torch.Tensor | None = None  # [docs + 1] int32, packed ("thd") batches only
    lengths: torch.Tensor | None = None  # [b] real tokens per row; right padding follows
    # what a stage or model family adds for its own forward (e.g. a DPO step's reference
    # log-probabilities); kept through padding
    extras: dict = field(default_factory=dict)

    @property
    def padding_mask(self) -> torch.Tensor | None:
        """[b, s] True at padding positions (Megatron's MoE routers leave those tokens out)."""
        if self.lengths is None:
            return None
        return torch.arange(self.tokens.shape[1]).unsqueeze(0) >= self.lengths.unsqueeze(1)

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def pad_multiple_for(tp: int, cp: int, sequence_parallel: bool) -> int:
    multiple = tp if sequence_parallel else 1
    if cp > 1:
        multiple = multiple * 2 * cp
    return multiple


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shift_document(labels: list[int]) -> list[int]:
    """Position i learns token i+1 of the same document; the last position learns nothing."""
    return labels[1:] + [IGNORE]


def collate(samples: list[Sample], pad_id: int, pad_multiple: int = 1) -> Batch:
    """Right-padded [b, s] batch; positions count from 0 in each row."""
    length = _round_up(max(len(s.input_ids) for s in samples), pad_multiple)
    tokens = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    for row, s in enumerate(samples):
        if len(s.doc_lens) > 1:
            raise ValueError("packed samples go through collate_packed")
        n = len(s.input_ids)
        tokens[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(shift_document(s.labels))
    positions = torch.arange(length).unsqueeze(0).expand(len(samples), -1).contiguous()
    return Batch(tokens, labels, positions, lengths=torch.tensor([len(s.input_ids) for s in samples]))


def collate_packed(samples: list[Sample], pad_id: int, pad_multiple: int = 1) -> Batch:
    """All documents of the micro-batch in one row, with cu_seqlens marking their bounds."""
    tokens: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    bounds = [0]
    for s in samples:
        start = 0
        for n in s.doc_lens:
            tokens += s.input_ids[start:start + n]
            labels += shift_document(s.labels[start:start + n])
            positions += range(n)
            bounds.append(bounds[-1] + n)
            start += n
    real = len(tokens)
    pad = _round_up(real, pad_multiple) - real
    if pad:
        tokens += [pad_id] * pad
        labels += [IGNORE] * pad
        positions += range(pad)
        bounds.append(bounds[-1] + pad)
    return Batch(
        torch.tensor([tokens]),
        torch.tensor([labels]),
        torch.tensor([positions]),
        torch.tensor(bounds, dtype=torch.int32),
        torch.tensor([real]),
    )


def pad_to_length(batch: Batch, length: int, pad_id: int) -> Batch:
    """Right-pad a batch to `length` positions (packed batches get one more, fully masked,
    document). Pipeline stages exchange fixed-shape activations, so every micro-batch of a step
    is brought to the same length."""
    extra = length - batch.tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a batch of length {batch.tokens.shape[1]} to {length}")
    if extra == 0:
        return batch
    rows = batch.tokens.shape[0]
    tokens = torch.cat([batch.tokens, torch.full((rows, extra), pad_id, dtype=batch.tokens.dtype)], dim=1)
    labels = torch.cat([batch.labels, torch.full((rows, extra), IGNORE, dtype=batch.labels.dtype)], dim=1)
    if batch.cu_seqlens is None:
        positions = torch.arange(length).unsqueeze(0).expand(rows, -1).contiguous()
        return Batch(tokens, labels, positions, lengths=batch.lengths, extras=batch.extras)
    positions = torch.cat([batch.position_ids, torch.arange(extra).unsqueeze(0)], dim=1)
    bounds = torch.cat([batch.cu_seqlens, batch.cu_seqlens[-1:] + extra])
    return Batch(tokens, labels, positions, bounds, batch.lengths, batch.extras)


def mask_out(batch: Batch) -> Batch:
    """The same inputs with nothing to learn (a rank with no evaluation samples of its own runs
    one of another rank's so it joins the collectives, and counts nothing)."""
    return replace(batch, labels=torch.full_like(batch.labels, IGNORE))

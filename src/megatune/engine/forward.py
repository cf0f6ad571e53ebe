"""One micro-batch through a Megatron GPTModel chunk: inputs, packed-sequence params, token losses."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams

from megatune.data.collator import Batch
from megatune.data.processors import IGNORE


def packed_seq_params(batch: Batch, device: torch.device) -> PackedSeqParams | None:
    """Document bounds for Megatron's "thd" path, so attention never crosses documents."""
    if batch.cu_seqlens is None:
        return None
    longest = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())  # on the host: no device sync
    cu = batch.cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        cp_group=ps.get_context_parallel_group(),
    )


def token_losses(model, batch: Batch, device: torch.device) -> torch.Tensor:
    """Per-token cross-entropy [b, s] (fp32) on the last stage; zero where labels are IGNORE.

    Megatron's vocab-parallel cross-entropy takes targets as given, so `batch.labels` must
    already be next-token targets (the collator shifts them, once).
    """
    labels = batch.labels.to(device)
    mask = labels != IGNORE
    losses = model(
        batch.tokens.to(device),
        batch.position_ids.to(device),
        None,
        labels=torch.where(mask, labels, torch.zeros_like(labels)),
        packed_seq_params=packed_seq_params(batch, device),
    )
    return losses.float() * mask

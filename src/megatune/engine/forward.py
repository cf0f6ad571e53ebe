"""Model inputs that Megatron builds from a collated batch: packed-sequence parameters."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams

from megatune.data.collator import Batch


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

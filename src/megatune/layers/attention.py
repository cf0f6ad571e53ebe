"""Core attention on `torch.nn.functional.scaled_dot_product_attention`.

Megatron's own `DotProductAttention` materialises the full score matrix with a fused softmax that
needs CUDA; SDPA picks flash/memory-efficient kernels on GPU and a correct math path on CPU.
Packed batches (document bounds in `cu_seqlens`) run torch's varlen flash attention on CUDA in
half precision, and SDPA with a block-diagonal causal mask otherwise.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Drop-in for Megatron's core attention: takes [s, b, heads, dim], returns [s, b, heads*dim]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError(
                "context parallelism needs Transformer Engine attention; "
                "set context_parallel_size: 1 or install megatune[te]"
            )
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by the SDPA attention")
        mask_type = attn_mask_type or self.attn_mask_type
        packed = query.dim() == 3  # Megatron squeezes the batch dim for packed ("thd") input
        if packed and packed_seq_params is not None and mask_type == AttnMaskType.causal and self._varlen_ok(query):
            cu = packed_seq_params.cu_seqlens_q.to(device=query.device, dtype=torch.int32)
            out = varlen_causal_attention(query, key, value, cu, int(packed_seq_params.max_seqlen_q), self.softmax_scale)
            return out.reshape(out.shape[0], 1, -1)  # [t, 1, h*d], as Megatron reshapes
        if packed:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        causal = mask_type == AttnMaskType.causal
        if packed_seq_params is not None:
            # Block-diagonal causal mask: exact on any device, O(t^2) memory.
            mask = document_causal_mask(packed_seq_params.cu_seqlens_q, q.shape[2], q.device)
            causal = False
        elif attention_mask is not None:
            # Megatron masks are True where attention is *not* allowed.
            mask = ~attention_mask
            causal = False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # packed: [t, 1, h*d], as Megatron reshapes


    def _varlen_ok(self, query: torch.Tensor) -> bool:
        """The flash varlen kernel: CUDA on sm80 or newer, half precision, a head size it
        supports (a multiple of 8, at most 256), no attention dropout."""
        return (
            query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] % 8 == 0
            and query.shape[-1] <= 256
            and (self.dropout == 0.0 or not self.training)
            and varlen_kernel() is not None
            and sm80_or_newer(query.device)
        )


def sm80_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


@functools.lru_cache(maxsize=None)
def varlen_kernel() -> Optional[Callable]:
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _keywords(kernel: Callable) -> frozenset:
    return frozenset(inspect.signature(kernel).parameters)


def varlen_causal_attention(q, k, v, cu_seqlens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """Causal attention within each document of a packed [t, heads, dim] batch.

    The kernel's keywords moved between torch releases: 2.10 takes `is_causal` and no scale;
    2.11 takes `window_size=(-1, 0)` for causal and `scale`; 2.12 adds `enable_gqa`. Missing
    ones are made up for here: the scale by pre-scaling the query, GQA by repeating K/V heads.
    """
    kernel = varlen_kernel()
    params = _keywords(kernel)
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    else:  # the kernel applies 1/sqrt(dim)
        q = q * (scale * math.sqrt(q.shape[-1]))
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return kernel(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


def document_causal_mask(cu_seqlens: torch.Tensor, seq_len: int, device) -> torch.Tensor:
    """Boolean [1, 1, s, s] mask, True where a token may attend: causal and within its document."""
    positions = torch.arange(seq_len, device=device)
    doc = torch.bucketize(positions, cu_seqlens.to(device)[1:], right=True)
    same_doc = doc.unsqueeze(0) == doc.unsqueeze(1)
    causal = positions.unsqueeze(0) <= positions.unsqueeze(1)
    return (same_doc & causal)[None, None]

"""Row gather-sum, the MoE permute's and un-permute's one operation (layers/local_dispatch.py).

    out[i] = sum over j of x[index[i, j]]      x: [M, *row], index: [N, k] int64 -> [N, *row]

An index equal to M names an empty slot, which adds nothing: after an all-gather a rank holds
only a block of the experts, so a token has between 0 and k of its routed copies there.

On CUDA it is one Triton kernel: one program per output row and 1024 columns, k predicated
16-byte row loads (empty slots issue no memory traffic), an fp32 sum and one rounding. torch's
compiled formula reached 0.88 TB/s on the un-permute of Qwen3-30B-A3B's layer (16,384 tokens,
top-8, hidden 2048, bf16) and 0.46 TB/s with half the slots empty; the kernel 3.6 and 3.2 TB/s
(1 x H200, benchmarks/gather_sum_gpu.py; docs/train.md, session 7, call 4). No kernel library
offers it without Transformer Engine, whose fused permute we cannot install. Elsewhere (CPU,
float64, or no Triton) the formula runs eagerly, with the same fp32 accumulation.
"""

from __future__ import annotations

import functools
import math

import torch

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_BLOCK = 1024  # columns per program: 128 threads x 8 bf16 = one 16-byte load per thread and slot


def gather_sum(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = sum_j x[index[i, j]] over the slots with index[i, j] < M (see the module docstring).

    x: [M, *row] any float dtype; index: [N, k] int64 on x's device, entries in [0, M] (k = 1:
    every entry < M, a plain row gather). Returns [N, *row] in x's dtype; sums of half-precision
    rows accumulate in fp32 and round once. No autograd of its own on CUDA: `_GatherSum`
    (layers/local_dispatch.py) supplies the backward. Raises TypeError for a non-int64 index and,
    on CPU, IndexError for an entry above M (on CUDA such a slot counts as empty)."""
    if index.dtype != torch.int64:
        raise TypeError(f"gather_sum: index must be int64 (row offsets can pass 2^31), got {index.dtype}")
    num_slots = index.shape[1]
    if num_slots == 1:
        return x.index_select(0, index.reshape(-1))
    if x.is_cuda and x.dtype in _TRITON_DTYPES and _triton_kernel() is not None:
        return _gather_sum_triton(x, index)
    return _gather_sum_formula(x, index)


def _gather_sum_formula(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, 1))  # row M: the empty slots' zeros
    rows = padded.index_select(0, index.reshape(-1)).view(index.shape[0], index.shape[1], *x.shape[1:])
    return rows.sum(1)  # bf16/fp16: accumulates in fp32, rounds once


def _gather_sum_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    import triton

    num_rows, row_len = x.shape[0], math.prod(x.shape[1:])
    out = x.new_empty(index.shape[0], *x.shape[1:])
    if out.numel() == 0:
        return out
    if num_rows == 0:  # every slot is empty
        return out.zero_()
    block = min(_MAX_BLOCK, triton.next_power_of_2(row_len))
    grid = (index.shape[0], triton.cdiv(row_len, block))
    with torch.cuda.device(x.device):  # Triton launches on the current device
        _triton_kernel()[grid](x.contiguous(), index.contiguous(), out, num_rows, row_len, K=index.shape[1],
                               BLOCK=block, num_warps=4)
    return out


@functools.cache
def _triton_kernel():
    """The compiled-on-first-use Triton kernel, or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def gather_sum_kernel(x_ptr, index_ptr, out_ptr, num_rows, row_len, K: tl.constexpr, BLOCK: tl.constexpr):
        out_row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_row = cols < row_len
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(index_ptr + out_row * K + j)  # int64; num_rows: an empty slot
            total += tl.load(x_ptr + row * row_len + cols, mask=in_row & (row < num_rows), other=0.0).to(tl.float32)
        tl.store(out_ptr + out_row * row_len + cols, total.to(out_ptr.dtype.element_ty), mask=in_row)

    return gather_sum_kernel

"""Time of the MoE un-permute's gather-sum (layers/local_dispatch.py) on one GPU, Qwen3-30B-A3B's
layer (hidden 2048, top-8) at micro-batch 4 x 4096 tokens per rank:

- `local`: one rank holds every expert (N = T tokens, every slot filled);
- `all-gather EP=2, pad`: megatune's masked gather-sum for one rank's half of the experts after
  the all-gather (N = 2T tokens, about half the slots empty), compiled with the zero row as a pad;
- `all-gather EP=2, where`: the same with the empty slots zeroed by `torch.where` after an
  unpredicated load (the first version), for comparison;
- `embedding_bag`: torch's `F.embedding_bag(mode="sum")` over the same index (empty slots: weight 0);
- `triton`: a 20-line Triton kernel (one program per token and 1024 columns, predicated 16-byte
  loads, fp32 sum), here only as the bandwidth a dedicated kernel reaches.

    python benchmarks/gather_sum_gpu.py

Prints one JSON line per case: milliseconds per call (median of 20 after 5 warm-up calls) and the
bytes a perfect kernel would move (filled slots read + outputs written) per millisecond.
"""

from __future__ import annotations

import json

import torch

from megatune.layers.fused import compiled_for_cuda
from megatune.layers.local_dispatch import _dropless_routes, _gather_sum


def _where_formula(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    valid = index < x.shape[0]
    rows = x.index_select(0, index.clamp(max=x.shape[0] - 1).reshape(-1)).view(index.shape[0], index.shape[1], -1)
    return torch.where(valid.unsqueeze(-1), rows, 0).sum(1)


def _embedding_bag(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    valid = index < y.shape[0]
    return torch.nn.functional.embedding_bag(index.clamp(max=y.shape[0] - 1), y, mode="sum",
                                             per_sample_weights=valid.to(y.dtype))


_KERNEL = []


def _triton_gather_sum(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    import triton
    import triton.language as tl

    if not _KERNEL:
        @triton.jit
        def kernel(y_ptr, index_ptr, out_ptr, rows, hidden, K: tl.constexpr, BLOCK: tl.constexpr):
            token = tl.program_id(0).to(tl.int64)
            cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            in_row = cols < hidden
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for j in tl.static_range(K):
                row = tl.load(index_ptr + token * K + j)
                acc += tl.load(y_ptr + row * hidden + cols, mask=in_row & (row < rows), other=0.0).to(tl.float32)
            tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=in_row)

        _KERNEL.append(kernel)
    out = y.new_empty(index.shape[0], y.shape[1])
    _KERNEL[0][(index.shape[0], triton.cdiv(y.shape[1], 1024))](y, index, out, y.shape[0], y.shape[1],
                                                                K=index.shape[1], BLOCK=1024, num_warps=4)
    return out


def timed(fn, *args) -> float:
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    tokens, hidden, experts, topk = 4 * 4096, 2048, 128, 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    for case, ranks in (("local", 1), ("all-gather EP=2", 2)):
        n_tokens = tokens * ranks
        logits = torch.randn(n_tokens, experts, device="cuda", generator=gen)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(topk).indices, True)
        flat, source, rows, counts = _dropless_routes(routing_map, topk)
        n = int(counts[: experts // ranks].sum())
        local_rows = torch.where(rows < n, rows, n)  # this rank holds the first E / ranks experts
        y = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        ideal_bytes = (n + n_tokens) * hidden * 2
        variants = {"": lambda: _gather_sum(y, local_rows, masked=ranks > 1)}
        if ranks > 1:
            variants = {", pad": variants[""], ", where": lambda: compiled_for_cuda(_where_formula)(y, local_rows)}
        variants[", embedding_bag"] = lambda: _embedding_bag(y, local_rows)
        variants[", triton"] = lambda: _triton_gather_sum(y, local_rows)
        want = _where_formula(y, local_rows)  # eager
        for fn in variants.values():
            torch.testing.assert_close(fn(), want)
        for suffix, fn in variants.items():
            ms = timed(fn)
            print(json.dumps({"case": case + suffix, "tokens": n_tokens, "filled_slots": n, "ms": round(ms, 3),
                              "ideal_GB_per_s": round(ideal_bytes / ms / 1e6, 1),
                              "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()

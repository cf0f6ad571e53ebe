"""Time of the MoE un-permute's gather-sum (layers/gather_sum.py) on one GPU, Qwen3-30B-A3B's
layer (hidden 2048, top-8) at micro-batch 4 x 4096 tokens per rank, in two cases:

- `local`: one rank holds every expert (N = T tokens, every slot filled);
- `all-gather EP=2`: one rank's half of the experts after the all-gather (N = 2T tokens, about
  half the slots empty).

Each case runs megatune's `gather_sum` (the Triton kernel) and the alternatives it replaced or
was weighed against: torch.compile of the formula (with the zero row as a pad, and with
`torch.where` after an unpredicated load), and torch's `F.embedding_bag(mode="sum")`.

    python benchmarks/gather_sum_gpu.py

Prints one JSON line per variant: milliseconds per call (median of 20 after 5 warm-up calls) and
the bytes a perfect kernel would move (filled slots read + outputs written) per millisecond.
"""

from __future__ import annotations

import json

import torch

from megatune.layers.fused import compiled_for_cuda
from megatune.layers.gather_sum import _gather_sum_formula, gather_sum
from megatune.layers.local_dispatch import _dropless_routes


def _where_formula(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    valid = index < x.shape[0]
    rows = x.index_select(0, index.clamp(max=x.shape[0] - 1).reshape(-1)).view(index.shape[0], index.shape[1], -1)
    return torch.where(valid.unsqueeze(-1), rows, 0).sum(1)


def _embedding_bag(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    valid = index < y.shape[0]
    return torch.nn.functional.embedding_bag(index.clamp(max=y.shape[0] - 1), y, mode="sum",
                                             per_sample_weights=valid.to(y.dtype))


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
        variants = {
            ", megatune (Triton)": lambda: gather_sum(y, local_rows),
            ", compiled pad formula": lambda: compiled_for_cuda(_gather_sum_formula)(y, local_rows),
            ", compiled where formula": lambda: compiled_for_cuda(_where_formula)(y, local_rows),
            ", embedding_bag": lambda: _embedding_bag(y, local_rows),
        }
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

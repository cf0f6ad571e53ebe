"""layers/cross_entropy.py's chunked linear + cross-entropy under tensor parallelism: two gloo
processes each hold half of the vocabulary, and their per-token losses and gradients must equal
one process computing the full logits (`cross_entropy_loss_fusion` on TP > 1 GPUs)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

S, B, H, V, CHUNK = 7, 2, 16, 22, 3  # 14 tokens in chunks of 3: a ragged last chunk


def inputs():
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(S, B, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.3
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, 0], labels[1, -1] = 0, V - 1  # the first and last vocab entries, one on each rank
    upstream = torch.rand(B, S, generator=gen)  # e.g. a loss mask times 1/tokens
    return hidden, weight, labels, upstream


def worker(rank: int, port: int, results) -> None:
    from megatune.layers.cross_entropy import fused_linear_cross_entropy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        hidden, weight, labels, upstream = inputs()
        shard = weight.chunk(2)[rank].clone().requires_grad_(True)
        hidden = hidden.clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(hidden, shard, labels, CHUNK, tp_group=dist.group.WORLD)
        (loss * upstream).sum().backward()
        grad_hidden = hidden.grad.clone()
        dist.all_reduce(grad_hidden)  # each rank holds its vocab shard's part (Megatron's TP backward sums them)
        results[rank] = (loss.detach(), grad_hidden, shard.grad.clone())
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_linear_cross_entropy_equals_full_logits():
    from megatune.distributed import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), results), nprocs=2)
        got = dict(results)
    hidden, weight, labels, upstream = inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logits = hidden @ weight.t()  # [S, B, V]
    want = F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")  # [B, S]
    (want * upstream).sum().backward()
    for rank in (0, 1):
        loss, grad_hidden, grad_shard = got[rank]
        torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_hidden, hidden.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_shard, weight.grad.chunk(2)[rank], rtol=1e-5, atol=1e-6)

"""Packed-sequence attention on one GPU: torch's varlen flash kernel (what megatune runs on CUDA
in bf16/fp16) against SDPA with a block-diagonal causal mask (the exact path it replaces).

    python benchmarks/packed_attention_gpu.py [--tokens 16384] [--steps 10]

Prints JSON lines:
- `kernel`: one packed batch of random documents (heads 16, KV heads 8, head dim 128, bf16).
  Max |difference| of output and input gradients of each path against an fp32 per-document
  reference, and forward+backward time and peak memory of each path.
- `model`: a 4-layer Qwen3-style megatune model (hidden 1024, random weights, bf16) on a packed
  batch of documents, through `megatune.engine.forward.token_losses`. Per-token losses of the
  packed batch against each document run alone (max |difference|, for the varlen path and for
  the masked path), how many attention calls took the varlen kernel, and forward+backward time
  of each path.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from megatune.layers import attention
from megatune.layers.attention import document_causal_mask, varlen_causal_attention


def documents(total: int, gen: torch.Generator, shortest=64, longest=4096) -> torch.Tensor:
    lengths, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(shortest, longest, (1,), generator=gen)))
        lengths.append(n)
        left -= n
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def timed(fn, steps: int) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3, torch.cuda.max_memory_allocated() / 2**30


def masked(q, k, v, cu, scale):
    mask = document_causal_mask(cu, q.shape[0], q.device)
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


def kernel_report(tokens: int, steps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    cu = documents(tokens, gen).cuda()
    longest = int((cu[1:] - cu[:-1]).max())
    heads, kv, dim = 16, 8, 128
    scale = dim ** -0.5
    base = [torch.randn(tokens, h, dim, generator=gen) for h in (heads, kv, kv)]
    probe = torch.randn(tokens, heads, dim, generator=gen).cuda()

    def run(path, dtype):
        q, k, v = (t.cuda().to(dtype).requires_grad_() for t in base)
        out = path(q, k, v)
        grads = torch.autograd.grad((out.float() * probe).sum(), (q, k, v))
        return out.float(), [g.float() for g in grads]

    def per_document(q, k, v):
        parts = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            parts.append(F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                        scale=scale, enable_gqa=True).transpose(0, 1))
        return torch.cat(parts)

    ref_out, ref_grads = run(per_document, torch.float32)
    paths = {"varlen": lambda q, k, v: varlen_causal_attention(q, k, v, cu, longest, scale),
             "masked": lambda q, k, v: masked(q, k, v, cu, scale)}
    report = {"run": "kernel", "tokens": tokens, "documents": len(cu) - 1, "device": torch.cuda.get_device_name()}
    for name, path in paths.items():
        out, grads = run(path, torch.bfloat16)
        report[f"{name}_max_diff_out"] = float((out - ref_out).abs().max())
        report[f"{name}_max_diff_grad"] = max(float((g - r).abs().max()) for g, r in zip(grads, ref_grads))
        q, k, v = (t.cuda().to(torch.bfloat16).requires_grad_() for t in base)
        report[f"{name}_fwd_bwd_ms"], report[f"{name}_peak_gb"] = timed(lambda: path(q, k, v).sum().backward(), steps)
    return report


def model_report(tokens: int, steps: int) -> dict:
    from megatune.config import load_config, validate
    from megatune.data.collator import collate, collate_packed
    from megatune.data.processors import IGNORE, Sample
    from megatune.distributed import init_distributed
    from megatune.engine.forward import token_losses
    from megatune.models.build import build_model
    from megatune.models.weights import load_hf_weights
    from megatune.tiny import make_tiny_model

    path = make_tiny_model("qwen3", tempfile.mkdtemp(), seed=3, hidden_size=1024, intermediate_size=2816,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=64, num_hidden_layers=4)
    config = load_config(None, {"model_name_or_path": path, "bf16": True})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    init_distributed(validate(config, 1), seed=0)
    bundle = build_model(config, path)
    load_hf_weights(bundle, path)
    model = bundle.chunks[0]
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    cu = documents(tokens, gen, longest=2048)
    docs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ids = torch.randint(0, 256, (b - a,), generator=gen).tolist()
        docs.append(Sample(ids, [IGNORE] * ((b - a) // 3) + ids[(b - a) // 3:]))
    packed_batch = collate_packed(docs, pad_id=0)

    calls = {"varlen": 0}
    original = attention.varlen_causal_attention

    def counting(*args, **kwargs):
        calls["varlen"] += 1
        return original(*args, **kwargs)

    attention.varlen_causal_attention = counting
    report = {"run": "model", "tokens": tokens, "documents": len(docs)}
    with torch.no_grad():
        model.eval()
        separate = torch.cat([token_losses(model, collate([d], 0), device)[0].float() for d in docs])
        for name, kernel in (("varlen", attention.varlen_kernel()), ("masked", None)):
            attention.varlen_kernel = (lambda k=kernel: k)
            calls["varlen"] = 0
            packed = token_losses(model, packed_batch, device)[0].float()
            report[f"{name}_max_diff_loss_vs_separate"] = float((packed[: separate.numel()] - separate).abs().max())
            report[f"{name}_attention_calls_on_varlen"] = calls["varlen"]
    model.train()
    return report, model, packed_batch, device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(kernel_report(args.tokens, args.steps)), flush=True)
    kernel = attention.varlen_kernel()
    report, model, batch, device = model_report(args.tokens, args.steps)
    from megatune.engine.forward import token_losses

    for name, chosen in (("varlen", kernel), ("masked", None)):
        attention.varlen_kernel = (lambda k=chosen: k)
        report[f"{name}_fwd_bwd_ms"], report[f"{name}_peak_gb"] = timed(
            lambda: token_losses(model, batch, device).sum().backward(), args.steps)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()

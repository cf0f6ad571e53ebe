"""Baseline for `megatune train` throughput: a plain transformers training loop on one GPU on
the same model shape, sequence length and batch (SDPA attention, fused torch AdamW, clipping).
`--precision amp`: fp32 weights and optimizer with bf16 autocast (what LLaMA-Factory's full
fine-tuning runs by default); `--precision bf16`: pure bf16 weights and optimizer state.

Prints the same "tflops_per_gpu" as megatune's log (see engine/metrics.py for the formula).

    python benchmarks/hf_train_baseline.py --model_dir DIR --seq_len 2048 --micro_batch 1 --grad_accum 8 --steps 30
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM

    from megatune.models import get_provider

    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--grad_accum", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["amp", "bf16"], default="amp")
    args = parser.parse_args()
    dtype = torch.float32 if args.precision == "amp" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa").cuda()
    model.train()
    hf = model.config.to_dict()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    vocab = hf["vocab_size"]
    per_step = get_provider(hf).step_flops(hf, [args.seq_len] * (args.micro_batch * args.grad_accum))
    times = []
    for step in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.grad_accum):
            tokens = torch.randint(0, vocab, (args.micro_batch, args.seq_len), device="cuda", generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "amp"):
                loss = model(input_ids=tokens, labels=tokens).loss / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[args.warmup:]
    seconds = sum(steady) / len(steady)
    tokens = args.micro_batch * args.grad_accum * args.seq_len
    print(json.dumps({
        "baseline": f"transformers ({args.precision}) + fused AdamW",
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "tflops_per_gpu": per_step / seconds / 1e12,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1024**3,
    }))


if __name__ == "__main__":
    main()

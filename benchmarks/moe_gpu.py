"""MoE forward+backward throughput on one GPU: transformers' Qwen3-MoE vs megatune's Megatron model
with GroupedExperts (torch grouped_mm), same shape, same tokens.

Shape: Qwen3-30B-A3B's layers (hidden 2048, 32 heads, 4 KV heads, head_dim 128, 128 experts,
top-8, moe_intermediate 768, vocab 151936) cut to `--layers` layers, random bf16 weights written
with transformers (benchmarks/model_shapes.py's preset). Both sides run pure bf16, SDPA attention,
forward + backward of a mean token loss per micro-batch (no optimizer step: only the model's work
is compared). Model FLOPs count 6 x matmul parameters per token with only the routed (active)
experts plus the router, and causal attention (the model provider's step_flops).

    python benchmarks/moe_gpu.py [--layers 4] [--seq_len 4096] [--micro_batch 1] [--steps 10] [--warmup 3]
        [--runs hf megatune megatune_loop] [--model_dir /tmp/qwen3-30b-a3b-moe]

Prints one JSON line per run: tokens/s, model TFLOP/s per GPU, peak memory. `megatune_loop` is
megatune with `moe_grouped_gemm: false` (Megatron's SequentialMLP), the path this replaces.
Each run is a fresh process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def write_model(model_dir: str, layers: int) -> None:
    if (Path(model_dir) / "config.json").is_file():
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from model_shapes import PRESETS
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(PRESETS["qwen3-30b-a3b-4l"], num_hidden_layers=layers)
    config = AutoConfig.for_model(**shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    from megatune.tiny_tokenizer import make_tiny_tokenizer

    make_tiny_tokenizer(model_dir, family="qwen")


def batches(vocab: int, args):
    gen = torch.Generator().manual_seed(0)  # the same tokens for every run
    return [torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen) for _ in range(args.steps)]


def timed(step, tokens_list, warmup: int) -> float:
    times = []
    for tokens in tokens_list:
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(tokens.cuda())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[warmup:]
    return sum(steady) / len(steady)


def run_hf(args) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.train()

    def step(tokens):
        model(input_ids=tokens, labels=tokens).loss.backward()

    return {"run": "transformers bf16 (default experts implementation)", "hf": model.config.to_dict(),
            "seconds": timed(step, batches(model.config.vocab_size, args), args.warmup)}


def run_megatune(args, grouped: bool) -> dict:
    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed
    from megatune.layers.spec import moe_experts_description
    from megatune.models.build import build_model
    from megatune.models.weights import load_hf_weights

    config = load_config(None, {
        "model_name_or_path": args.model_dir, "bf16": True, "moe_grouped_gemm": grouped,
        "moe_token_dispatcher_type": "alltoall",
    })
    init_distributed(validate(config, 1), seed=0)
    bundle = build_model(config, args.model_dir)
    load_hf_weights(bundle, args.model_dir)
    model = bundle.chunks[0]
    model.train()
    positions = torch.arange(args.seq_len, device="cuda").unsqueeze(0).expand(args.micro_batch, -1)

    def step(tokens):
        per_token = model(tokens, positions, None, labels=tokens)  # [b, s] loss per token
        per_token.float().mean().backward()

    return {"run": f"megatune ({moe_experts_description(grouped)})", "hf": bundle.hf,
            "seconds": timed(step, batches(bundle.hf["vocab_size"], args), args.warmup)}


def child(args) -> None:
    from megatune.models import get_provider

    torch.cuda.reset_peak_memory_stats()
    if args.child == "hf":
        result = run_hf(args)
    else:
        result = run_megatune(args, grouped=args.child == "megatune")
    hf, seconds = result.pop("hf"), result.pop("seconds")
    tokens = args.micro_batch * args.seq_len
    flops = get_provider(hf).step_flops(hf, [args.seq_len] * args.micro_batch)
    print(json.dumps({
        **result,
        "layers": hf["num_hidden_layers"], "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "step_s": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "tflops_per_gpu": round(flops / seconds / 1e12, 2),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
        "gpu": torch.cuda.get_device_name(),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", default="/tmp/qwen3-30b-a3b-moe")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", nargs="+", default=["hf", "megatune", "megatune_loop"],
                        choices=["hf", "megatune", "megatune_loop"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    write_model(args.model_dir, args.layers)
    for run in args.runs:
        cmd = [sys.executable, __file__, "--child", run, *sys.argv[1:]]
        result = subprocess.run(cmd, cwd=REPO)
        if result.returncode:
            print(json.dumps({"run": run, "error": f"exit code {result.returncode}"}), flush=True)


if __name__ == "__main__":
    main()

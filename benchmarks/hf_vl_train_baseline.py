"""transformers' own Qwen2-VL training loop on one GPU, on exactly the global batches megatune
trains on (megatune's data pipeline and collator produce them), for the throughput comparison.

`--precision amp` (default): fp32 weights and AdamW (fused) with bf16 autocast (LLaMA-Factory's
default for full fine-tuning); `--precision bf16`: pure bf16 weights and optimizer state. SDPA
attention, loss = token mean over the global batch. Prints one JSON line: tokens/s, TFLOP/s
(the model provider's formula: decoder + vision tower), peak memory.

    python benchmarks/hf_vl_train_baseline.py CONFIG.yaml --steps 6 --warmup 2 [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from megatune.config import derive_layout, load_config
    from megatune.data.source import build_train_source
    from megatune.engine.step import micro_batches
    from megatune.models import get_provider
    from megatune.models.build import load_hf_config
    from megatune.stages import get_stage

    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["amp", "bf16"], default="amp")
    args = parser.parse_args()
    amp = args.precision == "amp"
    config = load_config(args.config, {})
    model_dir = config.model.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stage = get_stage(config)
    stage.prepare_tokenizer(config, tokenizer)
    layout = derive_layout(config, 1)
    source, _, _ = build_train_source(config, tokenizer, layout.global_batch_size)
    _, hf = load_hf_config(model_dir)
    provider = get_provider(hf)
    cuda = torch.cuda.is_available()  # CPU only for a smoke test of this script
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float32 if amp else torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(dev)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    image_id = hf["image_token_id"]
    import inspect

    # transformers builds M-RoPE positions from mm_token_type_ids in recent releases
    takes_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    times, tokens, flops = [], [], []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        global_batch = source.next_global_batch()
        batches = micro_batches(stage, global_batch, layout.micro_batch_size, tokenizer.pad_token_id, 1, False)
        count = sum(b.num_loss_tokens for b in batches)
        sync()
        start = time.perf_counter()
        for b in batches:
            ids = b.tokens.to(dev)
            mask = (torch.arange(ids.shape[1]).unsqueeze(0) < b.lengths.unsqueeze(1)).to(dev)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda and amp):
                logits = model(input_ids=ids, attention_mask=mask,
                               pixel_values=b.extras["pixel_values"].to(dev, dtype),
                               image_grid_thw=b.extras["image_grid_thw"].to(dev),
                               **({"mm_token_type_ids": (ids == image_id).int()} if takes_types else {})).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b.labels.to(dev).flatten(),
                                                     ignore_index=-100, reduction="sum") / count
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            doc_lens = [n for s in global_batch for n in s.doc_lens]
            tokens.append(sum(doc_lens))
            flops.append(provider.step_flops(hf, doc_lens, [g for s in global_batch for g in s.image_grid_thw]))
    seconds = sum(times)
    print(json.dumps({
        "run": f"transformers {args.precision} ({'fp32 weights, bf16 autocast' if amp else 'bf16 weights'}), 1 GPU",
        "tokens_per_s": sum(tokens) / seconds,
        "tflops_per_gpu": sum(flops) / seconds / 1e12,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
        "step_s": seconds / len(times),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }), flush=True)


if __name__ == "__main__":
    main()

"""Preprocessing throughput: samples/s of the sft pipeline on LLaMA-Factory's alpaca_en_demo.

    python benchmarks/data_throughput.py [--dataset_dir ../shared/fixtures/lf_data] [--workers 1 2]

Uses an offline tokenizer (byte-level BPE) with the real Qwen3 chat template when the fixtures
are present; prints one line per worker count.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from megatune.config import load_config
from megatune.data.pipeline import build_samples
from megatune.tiny_tokenizer import make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset_dir", default=str(REPO.parent / "shared" / "fixtures" / "lf_data"))
    parser.add_argument("--dataset", default="alpaca_en_demo")
    parser.add_argument("--template", default="qwen3")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tokenizer = make_tiny_tokenizer(family="qwen")
    for workers in args.workers:
        best = float("inf")
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as cache:
                config = load_config(None, {
                    "dataset": args.dataset, "dataset_dir": args.dataset_dir, "template": args.template,
                    "cutoff_len": 1024, "preprocessing_num_workers": workers,
                })
                import datasets

                datasets.disable_caching()
                start = time.perf_counter()
                samples, stats = build_samples(config, tokenizer)
                best = min(best, time.perf_counter() - start)
        print(f"{args.dataset} workers={workers}: {stats.samples} samples in {best:.2f}s "
              f"= {stats.samples / best:.0f} samples/s ({stats.tokens / best:.0f} tokens/s), best of {args.repeat}")


if __name__ == "__main__":
    main()

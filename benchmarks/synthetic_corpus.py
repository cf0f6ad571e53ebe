"""Write a synthetic pretraining corpus (jsonl, column "text") plus its dataset_info.json, for
throughput runs on machines with no data: random English-like words, deterministic per seed.

    python benchmarks/synthetic_corpus.py --output_dir /tmp/corpus --documents 2000 --words 1500

With `--pairs`, it also writes preference pairs (alpaca columns instruction/chosen/rejected, a
prompt of words/5 words and two answers of `words` each) as `synthetic_pairs` (ranking) and the
same prompts with the chosen answers as `synthetic_chosen` (sft), for DPO-vs-SFT runs.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "the model learns from data one token at a time while the optimizer follows the gradient "
    "and every layer adds attention to what came before so that a sentence can be read as a "
    "whole question answer system user assistant paris france weather sunny number seven "
    "training loss falls slowly then quickly parallel tensor pipeline expert sequence context"
).split()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--words", type=int, default=1500, help="words per document")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", action="store_true")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    with open(out / "corpus.jsonl", "w") as f:
        for _ in range(args.documents):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(args.words))}) + "\n")
    info = {"synthetic_corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}}
    if args.pairs:
        def words(n):
            return " ".join(rng.choice(WORDS) for _ in range(n))

        rows = [{"instruction": words(args.words // 5), "chosen": words(args.words), "rejected": words(args.words)}
                for _ in range(args.documents)]
        (out / "pairs.json").write_text(json.dumps(rows))
        (out / "chosen.json").write_text(json.dumps([{"instruction": r["instruction"], "output": r["chosen"]} for r in rows]))
        info["synthetic_pairs"] = {"file_name": "pairs.json", "ranking": True,
                                   "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}
        info["synthetic_chosen"] = {"file_name": "chosen.json"}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {args.documents} documents to {out}/corpus.jsonl")


if __name__ == "__main__":
    main()

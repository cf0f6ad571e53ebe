"""Compare megatune's sft / dpo encoding with LLaMA-Factory 0.9.5's own preprocessing, token for token.

Random chats (1-4 turns; words, digits, punctuation, non-ASCII, leading/trailing spaces and
newlines, sometimes a system prompt) are encoded by both at random cutoff_len, with
mask_history and train_on_prompt at random (sft), through LLaMA-Factory's
SupervisedDatasetProcessor / PairwiseDatasetProcessor and megatune's templates + processors,
with the offline tiny tokenizer (Llama 3 family for `llama3`, Qwen family for the rest).
Prints how many cases give identical input_ids and labels. Not part of the test suite: it needs
LLaMA-Factory, which megatune never depends on. Setup (a scratch venv that borrows megatune's
packages through a .pth file and adds only LLaMA-Factory and the two packages its data modules
import, so nothing is installed into megatune's own venv):

    python3.11 -m venv /tmp/lfenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/lfenv/lib/python3.11/site-packages/megatune_venv.pth
    /tmp/lfenv/bin/pip install --no-deps llamafactory==0.9.5 peft==0.18.1 accelerate==1.11.0
    PYTHONPATH=src /tmp/lfenv/bin/python scripts/compare_with_llamafactory.py --cases 2000 --seed 1
    PYTHONPATH=src /tmp/lfenv/bin/python scripts/compare_with_llamafactory.py --stage dpo --cases 1000 --seed 2

`--templates qwen3` compares the thinking template, where our deliberate differences show
(docs/data.md, "Differences from LLaMA-Factory"); `--show N` prints the first N differences.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import logging
import os
import random
import sys
import types
from collections import Counter
from types import SimpleNamespace

IGNORE = -100
DEFAULT_TEMPLATES = "empty,default,alpaca,chatml,qwen,qwen3_nothink,llama3,mistral"
WORDS = ("the a model Paris answer 42 2024 3.14 hello world Magnetron tortoise ### : , . ? ! { } "
         "\"name\": def return x+y 0 7 nor tage M 4nortageM über café").split()


def import_llamafactory():
    """LLaMA-Factory's template and processor modules, without running `llamafactory.data`'s
    package init (it imports the collators, hence peft models, trl, ...)."""
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    spec = importlib.util.find_spec("llamafactory")
    if spec is None:
        sys.exit("llamafactory is not importable: see this script's docstring for the scratch venv")
    data_dir = os.path.join(os.path.dirname(spec.origin), "data")
    package = types.ModuleType("llamafactory.data")
    package.__path__ = [data_dir]
    package.__spec__ = importlib.machinery.ModuleSpec("llamafactory.data", None, is_package=True)
    package.__spec__.submodule_search_locations = [data_dir]
    sys.modules["llamafactory.data"] = package
    import transformers  # noqa: F401  (before the stub below, so it sees no torchaudio)

    try:  # imported by mm_plugin, unused for text
        import torchaudio  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    from llamafactory.data.processor.pairwise import PairwiseDatasetProcessor
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer

    return SimpleNamespace(sft=SupervisedDatasetProcessor, dpo=PairwiseDatasetProcessor,
                           template=get_template_and_fix_tokenizer)


def random_text(rng: random.Random, low: int, high: int) -> str:
    out = "".join(rng.choice(WORDS) + rng.choice([" ", " ", " ", "", "\n", "  "])
                  for _ in range(rng.randint(low, high)))
    if rng.random() < 0.5:
        out = out.rstrip()
    if rng.random() < 0.2:
        out = rng.choice(["\n", " ", "\n\n", "  "]) + out
    return out or "x"


def random_chat(rng: random.Random, stage: str) -> tuple[list[tuple[str, str]], str | None]:
    """[(role, content), ...] alternating user/assistant; for dpo two final answers (chosen, rejected)."""
    messages = []
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        messages += [("user", random_text(rng, 1, 25)), ("assistant", random_text(rng, 1, 60))]
    if stage == "dpo":
        messages.append(("assistant", random_text(rng, 1, 60)))
    return messages, (random_text(rng, 1, 8) if rng.random() < 0.3 else None)


def tokenizer_for(template: str):
    from megatune.tiny_tokenizer import make_tiny_tokenizer

    return make_tiny_tokenizer(family="llama3" if template == "llama3" else "qwen")


def megatune_encode(stage, template, messages, system, cutoff, mask_history, train_on_prompt):
    from megatune.data.conversation import Conversation, Message, Role
    from megatune.data.pairwise import PreferencePair, encode_pair, pair_samples
    from megatune.data.processors import supervised_sample
    from megatune.data.registry import DataError
    from megatune.data.templates import apply_template_eos, get_template

    tok, named = tokenizer_for(template), get_template(template)
    apply_template_eos(tok, named)
    if stage == "dpo":
        prompt = Conversation([Message(Role(r), c) for r, c in messages[:-2]], system=system)
        chosen, rejected = (Message(Role.ASSISTANT, content) for _, content in messages[-2:])
        pair = PreferencePair(prompt, chosen, rejected)
        try:
            chosen, rejected = pair_samples(encode_pair(named, tok, pair), cutoff)
        except DataError:
            return None
        return chosen.input_ids, chosen.labels, rejected.input_ids, rejected.labels
    conversation = Conversation([Message(Role(r), c) for r, c in messages], system=system)
    sample = supervised_sample(named.encode(tok, conversation), cutoff, train_on_prompt, mask_history)
    return None if sample is None else (sample.input_ids, sample.labels)


def llamafactory_encode(lf, stage, template, messages, system, cutoff, mask_history, train_on_prompt):
    tok = tokenizer_for(template)
    args = SimpleNamespace(template=template, tool_format=None, default_system=None, enable_thinking=True,
                           preserve_thinking=False, train_on_prompt=train_on_prompt, cutoff_len=cutoff,
                           mask_history=mask_history)
    lf_template = lf.template(tok, args)
    processor = getattr(lf, stage)(template=lf_template, tokenizer=tok, processor=None, data_args=args)
    msgs = [{"role": r, "content": c} for r, c in messages]
    split = -2 if stage == "dpo" else -1
    return tuple(processor._encode_data_example(msgs[:split], msgs[split:], system, "", [], [], []))


def learns_nothing(encoded) -> bool:
    return all(x == IGNORE for labels in encoded[1::2] for x in labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    parser.add_argument("--templates", default=DEFAULT_TEMPLATES)
    parser.add_argument("--show", type=int, default=0, help="print the first N differing cases")
    opts = parser.parse_args()
    logging.disable(logging.WARNING)
    lf = import_llamafactory()
    templates = opts.templates.split(",")
    rng = random.Random(opts.seed)
    tally, differing, shown = Counter(), Counter(), 0
    for k in range(opts.cases):
        template = templates[k % len(templates)]
        messages, system = random_chat(rng, opts.stage)
        full = len(llamafactory_encode(lf, opts.stage, template, messages, system, 10**6, False, False)[0])
        cutoff = rng.choice([rng.randint(2, full + 3), rng.randint(max(2, full // 3), full)])
        mask_history, train_on_prompt = rng.random() < 0.4, rng.random() < 0.2
        if opts.stage == "dpo":
            mask_history = train_on_prompt = False  # not options of pairwise data, in either
        case = (opts.stage, template, messages, system, cutoff, mask_history, train_on_prompt)
        ours, theirs = megatune_encode(*case), llamafactory_encode(lf, *case)
        if ours == theirs:
            tally["identical"] += 1
        elif ours is None and learns_nothing(theirs):
            tally["nothing to learn in both (megatune refuses the row, LLaMA-Factory keeps it)"] += 1
        else:
            # a rendering difference shows without truncation too; else it is the truncation
            whole = (opts.stage, template, messages, system, 10**6, mask_history, train_on_prompt)
            kind = "rendering" if megatune_encode(*whole) != llamafactory_encode(lf, *whole) else "truncation"
            tally[f"different ({kind})"] += 1
            differing[f"{template}{' mask_history' if mask_history else ''}, {kind}"] += 1
            if shown < opts.show:
                shown += 1
                print(f"--- {case!r}\n megatune:       {ours}\n LLaMA-Factory:  {theirs}")
    print(f"{opts.stage}, {opts.cases} cases, seed {opts.seed}, templates {opts.templates}: {dict(tally)}")
    if differing:
        print("differing cases by template:", dict(differing))


if __name__ == "__main__":
    main()

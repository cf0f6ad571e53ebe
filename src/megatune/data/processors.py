"""Turn conversations / raw text into training samples: `input_ids` and `labels` (-100 = masked).

Labels here are aligned with inputs, Hugging Face style (labels[i] is token i itself, or -100);
the single shift to next-token targets happens in the collator, per document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

IGNORE = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    doc_lens: list[int] = field(default_factory=list)  # packed samples: lengths of each document
    truncated: bool = False
    # vision-language samples: image references and (t, h, w) patch grids, in token order
    # (data/multimodal.py); empty for text
    images: list = field(default_factory=list)
    image_grid_thw: list = field(default_factory=list)

    def __post_init__(self):
        if not self.doc_lens:
            self.doc_lens = [len(self.input_ids)]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def split_budget(source_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and response tokens to keep when a turn overflows `budget`.

    A short side is kept whole and the other gets the rest; when both are long, the budget is
    shared in proportion to their lengths, so neither prompt nor answer vanishes.
    """
    if source_len + target_len <= budget:
        return source_len, target_len
    if 2 * target_len < budget:
        return budget - target_len, target_len
    if 2 * source_len < budget:
        return source_len, budget - source_len
    keep_target = max(1, int(budget * target_len / (source_len + target_len)))
    return budget - keep_target, keep_target


def supervised_sample(
    turns: list[tuple[list[int], list[int]]],
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> Sample | None:
    """Concatenate encoded turns, masking prompts (and earlier answers with mask_history)."""
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = False
    for i, (prompt, response) in enumerate(turns):
        budget = cutoff_len - len(input_ids)
        if budget <= 0:
            truncated = True
            break
        keep_p, keep_r = split_budget(len(prompt), len(response), budget)
        truncated |= (keep_p, keep_r) != (len(prompt), len(response))
        prompt, response = prompt[:keep_p], response[:keep_r]
        last = i == len(turns) - 1
        learn = not mask_history or last
        input_ids += prompt + response
        labels += (prompt if train_on_prompt else [IGNORE] * len(prompt))
        labels += response if learn else [IGNORE] * len(response)
    if all(label == IGNORE for label in labels):
        return None  # nothing to learn (e.g. the answer was cut away entirely)
    return Sample(input_ids, labels, truncated=truncated)


def chunk_documents(token_streams: Iterable[list[int]], eos_id: int, cutoff_len: int) -> Iterator[Sample]:
    """Each text + eos, all concatenated, cut into blocks of cutoff_len as soon as a block is
    full (lazy, so a stream never sits in memory); the tail that fills no block is dropped."""
    flat: list[int] = []
    for ids in token_streams:
        flat += list(ids) + [eos_id]
        full = len(flat) - len(flat) % cutoff_len
        for start in range(0, full, cutoff_len):
            block = flat[start:start + cutoff_len]
            yield Sample(block, list(block))
        del flat[:full]


def pack_samples(samples: list[Sample], cutoff_len: int) -> list[Sample]:
    """Greedy first-fit-decreasing packing up to cutoff_len tokens, keeping document lengths.

    Attention never crosses a document boundary (the model gets the lengths as cu_seqlens),
    and positions restart at every document, so a packed sample computes exactly what its
    documents would compute alone.
    """
    bins: list[list[Sample]] = []
    space: list[int] = []
    for sample in sorted(samples, key=lambda s: len(s.input_ids), reverse=True):
        n = len(sample.input_ids)
        for i, free in enumerate(space):
            if n <= free:
                bins[i].append(sample)
                space[i] -= n
                break
        else:
            bins.append([sample])
            space.append(cutoff_len - n)
    packed = []
    for group in bins:
        packed.append(
            Sample(
                input_ids=[t for s in group for t in s.input_ids],
                labels=[t for s in group for t in s.labels],
                doc_lens=[len(s.input_ids) for s in group],
                truncated=any(s.truncated for s in group),
                images=[i for s in group for i in s.images],
                image_grid_thw=[g for s in group for g in s.image_grid_thw],
            )
        )
    return packed

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


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many prompt (source) and response (target) tokens to keep under a budget of
    `cutoff_len` tokens: LLaMA-Factory 0.9.5's rule (`infer_seqlen` in its
    data/processor/processor_utils.py), reproduced exactly because it decides which tokens are
    learned. The one implementation of the split: sft turns, preference pairs and image rows
    all use it.

    - A response shorter than half the budget is kept whole; the prompt gets the rest.
    - Else a prompt shorter than half the budget is kept whole; the response gets the rest.
    - Else the response gets int(cutoff_len * (target_len / (source_len + target_len))) tokens
      (this float expression, as there: its rounding decides ties) and the prompt the rest.
    A turn that fits is kept whole. A small budget may leave the response nothing (budget 1:
    one prompt token, no answer token), so no answer token is learned without its context.
    Lengths and budget are token counts >= 0; returns (kept prompt, kept response).
    """
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    keep_target = min(max_target, target_len)
    keep_source = min(max(cutoff_len - keep_target, 0), source_len)
    return keep_source, keep_target


def keep_lengths(
    lengths: list[tuple[int, int]], cutoff_len: int, mask_history: bool = False, floors: list[int] | None = None
) -> list[tuple[int, int]]:
    """Per turn, how many (prompt, response) tokens survive `cutoff_len`, in dialogue order.

    `lengths` holds each turn's (prompt, response) token counts. Turns take their share in
    order, each splitting what the earlier ones left with `infer_seqlen`; once the budget is
    spent the remaining turns keep (0, 0). With `mask_history` (only the last answer is
    learned) the order is reversed, as in LLaMA-Factory: the last turn is served first, then
    the history from the newest turn back, so it is the history that gets cut.

    `floors` (optional, per turn): a prompt length that must not be cut into (the end of its
    images, data/multimodal.py); where the split would cut a prompt below its floor the
    response gives way. A floor larger than what is left is not met: the caller sees kept
    prompt < floor and drops the row.
    """
    kept = [(0, 0)] * len(lengths)
    used = 0
    order = range(len(lengths) - 1, -1, -1) if mask_history else range(len(lengths))
    for i in order:
        budget = cutoff_len - used
        if budget <= 0:
            break
        prompt_len, response_len = lengths[i]
        keep_p, keep_r = infer_seqlen(prompt_len, response_len, budget)
        floor = floors[i] if floors else 0
        if keep_p < floor <= budget:  # never cut into a protected prefix: the answer gives way
            keep_p, keep_r = floor, min(response_len, budget - floor)
        kept[i] = (keep_p, keep_r)
        used += keep_p + keep_r
    return kept


def assemble_turns(
    turns: list[tuple[list[int], list[int]]],
    kept: list[tuple[int, int]],
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> Sample | None:
    """Concatenate each turn's kept prefix (`kept` from `keep_lengths`) into a `Sample`:
    labels -100 on prompts (unless train_on_prompt) and, with mask_history, on every answer
    but the last. Returns None when no label is left to learn."""
    input_ids: list[int] = []
    labels: list[int] = []
    last = len(turns) - 1
    for i, ((prompt, response), (keep_p, keep_r)) in enumerate(zip(turns, kept)):
        prompt, response = prompt[:keep_p], response[:keep_r]
        input_ids += prompt + response
        labels += prompt if train_on_prompt else [IGNORE] * len(prompt)
        labels += response if (not mask_history or i == last) else [IGNORE] * len(response)
    if all(label == IGNORE for label in labels):
        return None  # nothing to learn (e.g. the answer was cut away entirely)
    truncated = any(k != (len(p), len(r)) for (p, r), k in zip(turns, kept))
    return Sample(input_ids, labels, truncated=truncated)


def supervised_sample(
    turns: list[tuple[list[int], list[int]]],
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> Sample | None:
    """Encoded turns [(prompt_ids, response_ids), ...] -> one sft `Sample` of at most
    cutoff_len tokens, truncated as LLaMA-Factory's supervised processor does (`keep_lengths`)
    and masked by `assemble_turns`; None when nothing is left to learn."""
    kept = keep_lengths([(len(p), len(r)) for p, r in turns], cutoff_len, mask_history)
    return assemble_turns(turns, kept, train_on_prompt, mask_history)


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

"""Where the trainer's samples come from, step by step, resumably.

The trainer only asks a source for the next global batch (the samples of one optimizer step,
all data-parallel ranks together) and saves/restores its position. `MapSource` serves an
in-memory sample list in a seeded per-epoch order; a streaming source (data larger than
memory) implements the same four members.
"""

from __future__ import annotations

from typing import Protocol

from megatune.data.processors import Sample
from megatune.data.sampler import EpochShuffler


class SampleSource(Protocol):
    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps in one pass over the data; None when unknown (streaming)."""

    def next_global_batch(self) -> list[Sample]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MapSource:
    """A list of samples served in EpochShuffler order (ragged tail of each epoch dropped)."""

    def __init__(self, samples: list[Sample], global_batch_size: int, seed: int):
        self.samples = samples
        self.shuffler = EpochShuffler(len(samples), global_batch_size, seed)

    @property
    def steps_per_epoch(self) -> int:
        return self.shuffler.steps_per_epoch

    def next_global_batch(self) -> list[Sample]:
        return [self.samples[i] for i in self.shuffler.next_global_batch()]

    def state_dict(self) -> dict:
        return self.shuffler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shuffler.load_state_dict(state)


def rank_share(global_batch: list[Sample], dp_rank: int, dp_size: int) -> list[Sample]:
    """This data-parallel rank's contiguous share of a global batch."""
    per_rank = len(global_batch) // dp_size
    return global_batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]


def build_train_source(config, tokenizer, global_batch_size: int):
    """What the trainer consumes: (a SampleSource over the training data, eval samples, stats).
    With `streaming: true` the source reads and encodes lazily (data larger than memory) and
    the stats cover what has been read so far; see data/streaming.py."""
    if config.data.streaming:
        from megatune.data.streaming import build_stream_source

        return build_stream_source(config, tokenizer, global_batch_size)
    from megatune.data.pipeline import build_train_eval

    train, evals, stats = build_train_eval(config, tokenizer)
    return MapSource(train, global_batch_size, config.training.seed), evals, stats

"""Seeded per-epoch shuffling over data-parallel ranks, resumable to the exact sample.

The reference backend never shuffles; we draw a fresh permutation every epoch from
(seed, epoch), so the order depends on nothing but those two numbers and the position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EpochShuffler:
    num_samples: int
    global_batch_size: int  # samples consumed per optimizer step, all dp ranks together
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0  # samples of this epoch already consumed (a multiple of global batch)

    def __post_init__(self):
        if self.num_samples < self.global_batch_size:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch "
                f"({self.global_batch_size}); lower the batch size or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size  # the ragged tail is dropped

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def next_global_batch(self) -> list[int]:
        """Indices of the next step's global batch (all ranks); advances the position."""
        if self.position + self.global_batch_size > self.steps_per_epoch * self.global_batch_size:
            self.epoch += 1
            self.position = 0
        order = self.permutation(self.epoch)
        batch = order[self.position:self.position + self.global_batch_size]
        self.position += self.global_batch_size
        return batch

    @staticmethod
    def rank_slice(global_batch: list[int], dp_rank: int, dp_size: int) -> list[int]:
        """This data-parallel rank's contiguous share of a global batch."""
        per_rank = len(global_batch) // dp_size
        return global_batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(
                f"cannot resume the data order: the checkpoint was made with {state['num_samples']} "
                f"samples and seed {state['seed']}, this run has {self.num_samples} and {self.seed}"
            )
        self.epoch, self.position = state["epoch"], state["position"]

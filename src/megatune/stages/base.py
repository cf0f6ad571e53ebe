"""The training-stage interface, and the language-modelling loss that pt and sft share.

Loss convention (engine/optim.py runs Megatron with `calculate_per_token_loss`): a stage's loss
function returns, per micro-batch, (sum of the loss over its units, number of units, report).
Megatron sums both over micro-batches, and gradients are divided by the step's unit count over
all micro-batches and data-parallel ranks. For language modelling a unit is a target token, so
the step's loss is the global token mean, as in the Hugging Face Trainer.

Reported metrics travel as one vector of sums per micro-batch (`sum_names`), which
engine/step.py adds up over micro-batches and data-parallel ranks; `metrics` turns the step's
totals into logged values.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Iterator

import torch

from megatune.data.collator import Batch, collate, collate_packed
from megatune.data.processors import IGNORE, Sample


class Stage(ABC):
    name: str
    columns: tuple[str, ...]  # encoded-row columns this stage writes (besides "error")
    empty_row: dict  # those columns' values for a row that failed (datasets needs one schema)
    sum_names: tuple[str, ...]  # the per-micro-batch sums; [0] is the loss sum, [1] its unit count
    packable: bool = True  # samples may be packed several to a sequence (`packing: true`)

    @classmethod
    def from_config(cls, config) -> "Stage":
        return cls()

    # -- data -------------------------------------------------------------------------------

    features: dict | None = None  # datasets.Features of the encoded columns, when they cannot be inferred

    def fingerprint(self) -> dict:
        """What besides the data keys this stage's encoding depends on (for tokenized_path)."""
        return {}

    def required_columns(self, spec) -> list[str]:
        """The dataset_info.json column keys a row of `spec`'s dataset must have (launcher check)."""
        return ["prompt", "response"] if spec.formatting == "alpaca" else ["messages"]

    def prepare_tokenizer(self, config, tokenizer) -> str | None:
        """Adjust the tokenizer for this run before encoding (returns a note when it changed)."""
        return None

    @abstractmethod
    def encode(self, row: dict, spec, source: str, template, tokenizer, data_config) -> dict:
        """One raw dataset row -> this stage's encoded columns. `source` names the row in
        messages; raises data.registry.DataError for bad input."""

    @abstractmethod
    def to_sample(self, encoded: dict) -> Sample:
        """One good encoded row -> a document sample."""

    def assemble(self, docs: Iterable[Sample], cutoff_len: int, eos_id: int | None) -> Iterator[Sample]:
        """Documents (in training order) -> training samples; lazy, so streaming can use it."""
        return iter(docs)

    # -- model ------------------------------------------------------------------------------

    def collate(self, samples: list, pad_id: int, pad_multiple: int, packed: bool) -> Batch:
        """One micro-batch of samples -> model inputs (labels shifted to next-token targets)."""
        return (collate_packed if packed else collate)(samples, pad_id, pad_multiple)

    def sequence_length(self, samples: list, packed: bool) -> int:
        """Positions the collated micro-batch needs before rounding to `pad_multiple`."""
        if packed:
            return sum(len(s.input_ids) for s in samples)
        return max(len(s.input_ids) for s in samples)

    def attach(self, config, bundle) -> None:
        """Called once the policy model is built (e.g. to build a reference model beside it)."""

    def prepare(self, provider, batches: list[Batch]) -> None:
        """Called before each schedule run over `batches` (e.g. reference log-probabilities)."""

    @abstractmethod
    def loss_units(self, batch: Batch) -> int:
        """The count this micro-batch's loss is normalised by (its share of the step's units)."""

    @abstractmethod
    def forward_step(self, provider) -> Callable:
        """The `forward_step_func(data_iterator, model) -> (output, loss_func)` for Megatron's
        schedule; `provider` (models.provider.ModelProvider) runs the model on a Batch."""

    @abstractmethod
    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The step's (or evaluation's) totals of `sum_names` -> logged values; has "loss"."""


class LanguageModelStage(Stage):
    """Next-token cross-entropy over the labelled tokens (pt, sft)."""

    columns = ("input_ids", "labels", "truncated")
    empty_row = {"input_ids": [], "labels": [], "truncated": False}
    sum_names = ("loss_sum", "loss_tokens")

    def to_sample(self, encoded: dict) -> Sample:
        return Sample(list(encoded["input_ids"]), list(encoded["labels"]), truncated=bool(encoded["truncated"]))

    def loss_units(self, batch: Batch) -> int:
        return batch.num_loss_tokens

    def forward_step(self, provider) -> Callable:
        def forward_step(data_iterator, model):
            output, mask = forward_with_labels(provider, model, next(data_iterator), token_weighted=True)
            return output, lambda losses: token_loss_sums(losses, mask)

        return forward_step

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        count = sums["loss_tokens"]
        return {"loss": sums["loss_sum"] / count if count else float("nan"), "loss_tokens": count}


def forward_with_labels(provider, model, batch: Batch, token_weighted: bool = False):
    """Run a micro-batch with its next-token labels: (the chunk's output — per-token
    cross-entropy [b, s] on the last pipeline stage —, the loss mask [b, s] on this device).
    `token_weighted`: the caller reduces the losses as `token_loss_sums` does (a masked sum), so
    the fused cross-entropy may form its gradient in the forward (layers/cross_entropy.py)."""
    from megatune.distributed import device
    from megatune.layers.cross_entropy import token_weighted_loss

    dev = device()
    labels = batch.labels.to(dev)
    mask = labels != IGNORE
    labels = torch.where(mask, labels, torch.zeros_like(labels))
    with token_weighted_loss(mask) if token_weighted else contextlib.nullcontext():
        return provider.forward(model, batch, dev, labels=labels), mask


def token_loss_sums(losses: torch.Tensor, mask: torch.Tensor):
    """Megatron loss-function result for per-token losses [b, s] and a loss mask [b, s]:
    (fp32 sum over masked tokens, token count, {"sums": [sum, count]})."""
    loss_sum = (losses.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"sums": torch.stack([loss_sum.detach(), count.detach().float()])}

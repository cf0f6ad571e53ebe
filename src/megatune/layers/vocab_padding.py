"""Vocabulary padding for tensor parallelism, and keeping the padded logits out of every softmax.

Megatron splits the embedding and output layer by vocabulary rows over the TP ranks, so their
row count must divide by TP. A vocabulary that does not (151,669 entries for a Qwen3 reranker)
is padded as Megatron-LM does (`_vocab_size_with_padding`): up to the next multiple of
`make_vocab_size_divisible_by x tensor_model_parallel_size`. The HF rows fill the first `vocab`
rows; the padded rows are zero (models/mappings.py `VocabParallel`) and are dropped on export.

Padded logits must never count: Megatron-LM lets them into the softmax (its padded rows are
trained like any other), which would make our loss differ from transformers'. Here every logit
of a padded column is -inf before any softmax sees it, on the TP rank that holds the column:
- the plain path (GPTModel's output layer, then Megatron's vocab-parallel cross-entropy, or
  logits returned as they are for `megatune verify`): a forward hook on the output layer
  (`exclude_padded_logits`);
- the chunked path (layers/cross_entropy.py): the padded weight rows are never multiplied in,
  which is the same as -inf logits (exp(-inf) = 0) without computing them.
So the padded columns get probability 0, their logits' gradient is 0 (softmax - onehot, and the
target is never a padded id), the padded output rows get zero gradient and, with Adam and
decoupled weight decay, stay exactly zero; padded embedding rows are never looked up.

Default (`make_vocab_size_divisible_by: null`): pad only when TP does not divide the
vocabulary, then to Megatron's multiple of 128 x TP. A vocabulary TP already divides is left
as it is: padding would add memory and (plain path) matmul work for nothing, and the unpadded
model computes exactly what it always did (every existing parity test stays bit-identical).
Setting the key pads always, as Megatron-LM does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

MEGATRON_DIVISIBLE_BY = 128  # Megatron-LM's and mcore_adapter's default make_vocab_size_divisible_by


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: Optional[int] = None) -> int:
    """Rows of the Megatron embedding / output layer for an HF vocabulary of `vocab_size` under
    tensor parallelism `tp`: Megatron-LM's rule, the smallest multiple of `divisible_by x tp`
    at or above `vocab_size`. `divisible_by` None: `vocab_size` itself when `tp` divides it,
    else the rule with 128. Raises ValueError for sizes below 1."""
    if vocab_size < 1 or tp < 1 or (divisible_by is not None and divisible_by < 1):
        raise ValueError(f"vocab_size={vocab_size}, tp={tp}, make_vocab_size_divisible_by={divisible_by} "
                         "must all be at least 1")
    if divisible_by is None:
        if vocab_size % tp == 0:
            return vocab_size
        divisible_by = MEGATRON_DIVISIBLE_BY
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def real_rows(vocab_size: int, shard_rows: int, first_row: int) -> int:
    """How many of a vocab shard's `shard_rows` rows (global rows first_row ...) are real
    vocabulary entries (global index < vocab_size); the rest are padding. 0..shard_rows."""
    return max(0, min(shard_rows, vocab_size - first_row))


def padding_note(vocab_size: int, padded: int, tp: int) -> str | None:
    """The start-up line when the vocabulary is padded (None when it is not)."""
    if padded == vocab_size:
        return None
    return (f"vocabulary of {vocab_size} padded to {padded} rows ({padded // tp} per tensor-parallel rank); "
            f"the {padded - vocab_size} padded logits are excluded from the softmax and loss and the padding is "
            "dropped on export")


def mask_padded_logits(logits: torch.Tensor, vocab_size: int, first_column: int) -> torch.Tensor:
    """`logits` [..., n] whose last dim holds global vocabulary columns first_column ...
    first_column + n - 1, with the columns >= vocab_size set to -inf (a new tensor; the same
    one when no column is padding). The gradient of a masked column is zero."""
    n = logits.shape[-1]
    real = real_rows(vocab_size, n, first_column)
    if real == n:
        return logits
    padded = torch.arange(n, device=logits.device) >= real
    return logits.masked_fill(padded, float("-inf"))


def exclude_padded_logits(output_layer: torch.nn.Module, vocab_size: int) -> None:
    """Make a Megatron ColumnParallelLinear output layer (vocab-parallel, padded to
    `output_layer.output_size` rows) return -inf for every padded column, whether its output is
    this rank's shard [s, b, padded/tp] or gathered [s, b, padded]. Idempotent."""
    if getattr(output_layer, "_megatune_vocab_size", None) is not None:
        output_layer._megatune_vocab_size = vocab_size
        return

    def hook(module, args, output):
        logits, bias = output
        first = 0
        if logits.shape[-1] != module.output_size:  # this rank's shard, not gathered
            group = getattr(module, "tp_group", None)
            rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
            first = rank * logits.shape[-1]
        return mask_padded_logits(logits, module._megatune_vocab_size, first), bias

    output_layer._megatune_vocab_size = vocab_size
    output_layer.register_forward_hook(hook)

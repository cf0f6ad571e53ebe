"""Row encoding shared by the in-memory (pipeline.py) and streaming (streaming.py) data paths.

A raw row becomes the training stage's encoded columns plus `error` (empty when the row is
good): errors are returned rather than raised, so `skip_invalid` can count bad rows, and both
paths then fail or skip them with the same message. Encoded rows become samples through the
stage (`to_sample`, then `assemble`: chunking for pt), and `DataStats` counts what came out.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

from megatune.data.processors import Sample
from megatune.data.registry import DataError, describe_row

FIX_HINT = "fix the data or set skip_invalid: true to drop bad rows"
# The `error` of a row left out on purpose (e.g. its images do not fit cutoff_len), which is
# counted and warned about, never fatal.
DROPPED = "[dropped] "


@dataclass
class DataStats:
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    packing_efficiency: float | None = None  # real tokens / (packed sequences x cutoff_len)

    def line(self) -> str:
        parts = [
            f"samples={self.samples}",
            f"tokens={self.tokens}",
            f"loss_tokens={self.loss_tokens}",
            f"truncated={self.truncated}",
            f"dropped={self.dropped}",
        ]
        if self.packing_efficiency is not None:
            parts.append(f"packing_efficiency={self.packing_efficiency:.1%}")
        return " ".join(parts)

    def reset(self) -> None:
        for f in fields(DataStats):
            setattr(self, f.name, f.default)

    def add(self, sample: Sample, cutoff_len: int, packing: bool) -> None:
        """Count one training sample (after chunking / packing)."""
        self.samples += 1
        self.tokens += sample.num_tokens
        self.loss_tokens += sample.num_loss_tokens
        if packing:
            self.packing_efficiency = self.tokens / (self.samples * cutoff_len)


# The version of megatune's encoding rules (templates, truncation). Bump it whenever the same
# row and settings would encode differently: a `tokenized_path` cache written under other rules
# is refused, and `datasets.map`'s own cache (keyed on a hash of RowEncoder's state, not of the
# code it runs) misses. 2: LLaMA-Factory 0.9.5's truncation (mask_history serves the last turn
# first, its length split) and per-message tokenization.
ENCODING_RULES = 2


class RowEncoder:
    """`datasets.map` function: (row, index) -> the stage's encoded columns + `error`."""

    def __init__(self, stage, spec, template, tokenizer, data_config):
        self.stage, self.spec, self.template, self.tokenizer, self.data = stage, spec, template, tokenizer, data_config
        self.located = False
        self.rules = ENCODING_RULES  # part of the state datasets hashes for its map cache

    def __call__(self, row: dict, idx: int) -> dict:
        source = f"dataset '{self.spec.name}', file {self.spec.file_name}, row {idx}"
        from megatune.data.multimodal import RowDropped

        try:
            return {**self.stage.encode(row, self.spec, source, self.template, self.tokenizer, self.data), "error": ""}
        except RowDropped as err:
            return {**self.stage.empty_row, "error": DROPPED + str(err)}
        except DataError as err:
            message = str(err)
            if not self.located:  # the first bad row also gets its jsonl line (a file scan: once)
                self.located = True
                message = message.replace(source, describe_row(self.spec, idx), 1)
            return {**self.stage.empty_row, "error": message}


def encoded_columns(stage) -> list[str]:
    return [*stage.columns, "error"]


def interleave_probs(data_config) -> list[float] | None:
    """`interleave_probs: "0.3,0.7"` -> [0.3, 0.7]."""
    if not data_config.interleave_probs:
        return None
    try:
        return [float(p) for p in str(data_config.interleave_probs).split(",")]
    except ValueError:
        raise DataError(
            f"interleave_probs {data_config.interleave_probs!r} must be comma-separated numbers, one per dataset"
        ) from None


def check_errors(errors: list[str], skip_invalid: bool, total: int | None = None) -> int:
    """The encoded rows' non-empty `error`s (of `total` rows): raise for bad rows unless
    skip_invalid; warn once about rows dropped on purpose. Returns how many rows are left out."""
    import logging

    bad = [e for e in errors if not e.startswith(DROPPED)]
    dropped = [e[len(DROPPED):] for e in errors if e.startswith(DROPPED)]
    if bad and not skip_invalid:
        raise bad_rows_error(bad, total)
    if dropped:
        logging.getLogger(__name__).warning("%d row(s) left out; first: %s", len(dropped), dropped[0])
    return len(errors)


def bad_rows_error(errors: list[str], total: int | None = None) -> DataError:
    """The error for encoded rows that failed: the first message, how many more, what to do.
    When every one of `total` rows failed, the dataset's description is the likely culprit, and
    skip_invalid (which would drop everything) is not the fix."""
    more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
    if total is not None and len(errors) >= total > 1:
        return DataError(
            f"{errors[0]}{more}; every row failed, so the dataset's entry in dataset_info.json probably does "
            "not describe the file: check its `formatting`, `columns` and `tags` (skip_invalid would drop every row)"
        )
    return DataError(f"{errors[0]}{more}; {FIX_HINT}")


def samples_from_rows(rows: Iterable[dict], stage, cutoff_len: int, eos_id: int | None, stats: DataStats | None = None):
    """Good encoded rows (in training order) -> the stage's training samples, lazily; counts
    truncated rows and produced samples into `stats` as they pass (packing is done by the
    caller)."""
    def docs():
        for row in rows:
            sample = stage.to_sample(row)
            if stats is not None:
                stats.truncated += sample.truncated
            yield sample

    return stage.assemble(docs(), cutoff_len, eos_id)

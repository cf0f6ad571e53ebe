"""Training data larger than memory: a `SampleSource` that reads, encodes and batches lazily.

The map path (pipeline.py) encodes every row up front and shuffles indices; that needs the
whole dataset in memory. Here rows are read from disk as the trainer asks for them, encoded by
the same `RowEncoder` (so samples are token-identical), shuffled in a bounded seeded buffer,
chunked (`stage: pt`) or packed in a bounded window, and served one global batch at a time.
Memory is bounded by the buffers, never by the dataset.

The order is a pure function of (data, seed, epoch, buffer sizes): each epoch re-reads the
files from the start with a fresh shuffle seeded by (seed, epoch). That is what makes resume
exact without saving buffers: a checkpoint holds (epoch, samples consumed in that epoch, seed),
and `load_state_dict` re-reads the epoch and skips that many samples. Resume therefore costs
re-reading and re-tokenizing the consumed part of the current epoch (no model work), about as
long as `megatune data` takes on that much data.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

from megatune.config import Config
from megatune.data.encoding import (
    DROPPED,
    DataStats,
    RowEncoder,
    bad_rows_error,
    check_errors,
    encoded_columns,
    interleave_probs,
    samples_from_rows,
)
from megatune.data.pipeline import load_encoded, to_samples
from megatune.data.processors import Sample, pack_samples
from megatune.data.registry import DataError
from megatune.stages import get_stage
from megatune.stages.supervised import SupervisedStage

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 4096  # encoded rows held for shuffling (LLaMA-Factory's buffer_size plays this role)
PACK_BUFFER = 512  # rows packed together; bins rarely improve past a few hundred candidates
LOCATE_LIMIT = 1 << 30  # json files up to this size are re-read whole to locate a parse error


@dataclass
class StreamStats(DataStats):
    """DataStats of the current epoch as far as it has been read (a stream has no known total)."""

    epoch: int = 0

    def line(self) -> str:
        return f"streaming, epoch {self.epoch} read so far: {super().line()}"

    def start_epoch(self, epoch: int) -> None:
        self.reset()
        self.epoch = epoch


class StreamSource:
    """Serves global batches from `rows`, a re-iterable of encoded rows (dicts with the stage's
    encoded columns, e.g. a mapped `datasets.IterableDataset`); iterated once per epoch.

    Each epoch yields the stage's samples of the good rows (each row once for sft, the chunks of
    their concatenation for pt) in buffer-shuffled order; the ragged tail that does not fill a global batch is dropped, as
    in MapSource. `shuffle_buffer` <= 1 keeps file order.
    """

    def __init__(
        self,
        rows: Iterable[dict],
        global_batch_size: int,
        seed: int,
        *,
        cutoff_len: int,
        stage=None,
        eos_id: int | None = None,
        packing: bool = False,
        skip_invalid: bool = False,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        pack_buffer: int = PACK_BUFFER,
        name: str = "the training data",
        explain: Callable[[], str | None] | None = None,
    ):
        stage = stage or SupervisedStage()
        stage.assemble([], cutoff_len, eos_id)  # a stage that cannot assemble fails now, not mid-epoch
        self.rows, self.global_batch_size, self.seed = rows, global_batch_size, seed
        self.cutoff_len, self.stage, self.eos_id, self.packing = cutoff_len, stage, eos_id, packing
        self.skip_invalid, self.shuffle_buffer, self.pack_buffer = skip_invalid, shuffle_buffer, pack_buffer
        self.name, self.explain = name, explain  # explain: locates a reader error, if it can
        self.epoch = 0
        self.position = 0  # samples of this epoch already served
        self.stats = StreamStats()
        self._iter: Iterator[Sample] | None = None
        self._warned = False

    @property
    def steps_per_epoch(self) -> None:
        return None  # unknown until a full pass has been read

    def next_global_batch(self) -> list[Sample]:
        batch: list[Sample] = []
        while len(batch) < self.global_batch_size:
            sample = self._next()
            if sample is not None:
                batch.append(sample)
                continue
            if self.position == 0:  # a whole epoch gave less than one batch: looping cannot help
                self._raise_short(len(batch))
            self.epoch, self.position, self._iter, batch = self.epoch + 1, 0, None, []
        self.position += len(batch)
        return batch

    def epoch_samples(self) -> Iterator[Sample]:
        """Every sample of the current epoch from its start, in order (`megatune data`)."""
        self.position, self._iter = 0, None
        while (sample := self._next()) is not None:
            yield sample

    def check_not_empty(self) -> None:
        """Read up to the first sample (at most one shuffle buffer of rows), so that a stream
        with no usable rows fails before the model is built, not at the first step."""
        first = self._next()
        if first is None:
            self._raise_short(0)
        self._iter = itertools.chain([first], self._iter)

    def state_dict(self) -> dict:
        return {
            "streaming": True,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "pack_buffer": self.pack_buffer,
        }

    def load_state_dict(self, state: dict) -> None:
        """Go back to (epoch, position). Nothing but these numbers is saved: when the next batch
        is asked for, the epoch is re-read from the start of the files, re-encoded and
        `position` samples skipped, so resume costs tokenizing that much data again."""
        if not state.get("streaming"):
            raise DataError(
                "cannot resume the data order: the checkpoint was made without streaming: true; "
                "resume with the same `streaming` setting"
            )
        mine = self.state_dict()
        changed = [k for k in ("seed", "shuffle_buffer", "pack_buffer") if state.get(k) != mine[k]]
        if changed:
            were = ", ".join(f"{k} {state.get(k)} (now {mine[k]})" for k in changed)
            raise DataError(f"cannot resume the data order exactly: the checkpoint was made with {were}")
        self.epoch, self.position, self._iter = int(state["epoch"]), int(state["position"]), None

    # -----------------------------------------------------------------------------------------

    def _next(self) -> Sample | None:
        """The next sample of this epoch, None at its end. After an error the epoch iterator
        is dropped, so a retry re-reads to `position` and raises again instead of ending it."""
        try:
            return next(self._samples(), None)
        except BaseException:
            self._iter = None
            raise

    def _samples(self) -> Iterator[Sample]:
        """The current epoch's sample iterator, (re)started and fast-forwarded when needed."""
        if self._iter is None:
            self._iter = self._epoch(self.epoch)
            for skipped in range(self.position):
                if next(self._iter, None) is None:
                    raise DataError(
                        f"cannot resume: the checkpoint is {self.position} samples into epoch "
                        f"{self.epoch}, but {self.name} now gives only {skipped}; the data changed"
                    )
        return self._iter

    def _epoch(self, epoch: int) -> Iterator[Sample]:
        self.stats.start_epoch(epoch)
        rng = random.Random(self.seed * 1_000_003 + epoch)
        rows = _buffer_shuffle(self._good_rows(), self.shuffle_buffer, rng)
        samples = samples_from_rows(rows, self.stage, self.cutoff_len, self.eos_id, self.stats)
        if self.packing:
            samples = _packed(samples, self.cutoff_len, self.pack_buffer, rng if self.shuffle_buffer > 1 else None)
        for sample in samples:
            self.stats.add(sample, self.cutoff_len, self.packing)
            yield sample

    def _good_rows(self) -> Iterator[dict]:
        """Good encoded rows; a bad row raises (its message names dataset, file, row)
        unless skip_invalid, which counts it in stats.dropped."""
        rows = iter(self.rows)
        for read in itertools.count():
            try:
                row = next(rows)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as err:  # noqa: BLE001 - a reader error deep in a file: say where
                where = self.explain() if self.explain else None
                if where:
                    raise DataError(where) from err
                raise DataError(f"reading {self.name} failed after {read} rows of epoch {self.epoch}: {err}") from err
            if row["error"]:
                if not self.skip_invalid and not row["error"].startswith(DROPPED):
                    raise bad_rows_error([row["error"]])
                if not self._warned:
                    log.warning("skipping invalid rows (skip_invalid: true); first: %s", row["error"])
                    self._warned = True
                self.stats.dropped += 1
                continue
            yield row

    def _raise_short(self, got: int) -> None:
        dropped = f" ({self.stats.dropped} bad rows were dropped by skip_invalid)" if self.stats.dropped else ""
        if got == 0:
            raise DataError(f"{self.name} gave no samples in epoch {self.epoch}{dropped}; the stream is empty")
        raise DataError(
            f"{self.name} gives only {got} samples per epoch{dropped}, fewer than one global batch "
            f"({self.global_batch_size}); lower the batch size or add data"
        )


def _buffer_shuffle(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Seeded shuffle within a window of `size` items: each arriving item replaces a random
    buffered one, which is emitted. Memory is `size` items; `size` <= 1 keeps the order."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _packed(samples: Iterable[Sample], cutoff_len: int, window: int, rng: random.Random | None) -> Iterator[Sample]:
    """processors.pack_samples over consecutive windows of `window` samples (greedy packing in
    bounded memory); bins come out largest-first, so they are shuffled when `rng` is given."""
    samples = iter(samples)
    while group := list(itertools.islice(samples, max(1, window))):
        bins = pack_samples(group, cutoff_len)
        if rng is not None:
            rng.shuffle(bins)
        yield from bins


def locate_json_error(specs) -> str | None:
    """registry's json checker over the specs' json/jsonl files, for a parse error that the
    streaming reader reports without file or line; files over LOCATE_LIMIT are not re-read."""
    from megatune.data.registry import check_json_file, data_files

    for spec in specs:
        builder, files = data_files(spec)
        for file in files if builder == "json" else []:
            if Path(file).stat().st_size <= LOCATE_LIMIT:
                try:
                    check_json_file(spec, file)
                except DataError as err:
                    return str(err)
    return None


def encoded_stream(config: Config, tokenizer, dataset_names: str):
    """The datasets' rows read lazily, encoded by the same RowEncoder as the map path and mixed as
    configured: (a `datasets.IterableDataset` of the stage's encoded columns, re-iterable from the
    start; the dataset specs)."""
    from megatune.data.registry import data_files, load_rows, mix_datasets, resolve_datasets
    from megatune.data.templates import get_template

    import datasets

    d = config.data
    stage = get_stage(config)
    template = get_template(d.template or "auto")
    parts = []
    specs = resolve_datasets(dataset_names, d.dataset_dir)
    for spec in specs:
        files = data_files(spec)[1]
        if all(Path(f).stat().st_size == 0 for f in files):  # the streaming reader fails obscurely
            raise DataError(f"dataset '{spec.name}': {', '.join(files)} holds no rows")
        rows = load_rows(spec, d.dataset_dir, streaming=True, max_samples=d.max_samples, seed=config.training.seed)
        encode = RowEncoder(stage, spec, template, tokenizer, d)
        features = datasets.Features(stage.features) if stage.features else None
        if rows.column_names:
            parts.append(rows.map(encode, with_indices=True, remove_columns=rows.column_names, features=features))
        else:  # columns unknown until read: keep only ours after encoding
            parts.append(rows.map(encode, with_indices=True, features=features).select_columns(encoded_columns(stage)))
    return mix_datasets(parts, d.mix_strategy, interleave_probs(d), config.training.seed), specs


def held_out_samples(rows: Iterable[dict], config: Config, tokenizer) -> list[Sample]:
    """Materialize a small encoded stream (the validation rows) into samples, bad rows handled
    as in training."""
    good, bad = [], []
    for row in rows:
        (bad if row["error"] else good).append(row)
    check_errors([row["error"] for row in bad], config.data.skip_invalid)
    return to_samples(good, config, tokenizer)[0]


def build_stream_source(
    config: Config,
    tokenizer,
    global_batch_size: int,
    *,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    pack_buffer: int = PACK_BUFFER,
) -> tuple[StreamSource, list[Sample], StreamStats]:
    """(StreamSource, eval samples, live stats) for `streaming: true`. Validation is
    `eval_dataset` (loaded fully: it is small) or the first `val_size` rows (a count) of the
    mixed stream, which training then skips. Fails early when no sample can be read."""
    from megatune.data.registry import split_validation

    d = config.data
    if not d.dataset:
        raise DataError("no dataset given: set `dataset:` in the YAML or pass --dataset NAME")
    if d.tokenized_path:
        log.warning("tokenized_path is ignored with streaming: true (rows are encoded as they are read)")
    if d.preprocessing_num_workers and d.preprocessing_num_workers > 1:
        log.warning("preprocessing_num_workers is ignored with streaming: true (encoding runs inline)")
    rows, specs = encoded_stream(config, tokenizer, d.dataset)
    evals: list[Sample] = []
    if d.eval_dataset:
        evals = to_samples(load_encoded(config, tokenizer, d.eval_dataset)[0], config, tokenizer)[0]
    elif d.val_size:
        rows, held_out = split_validation(rows, d.val_size, config.training.seed)
        evals = held_out_samples(held_out, config, tokenizer)
    source = StreamSource(
        rows,
        global_batch_size,
        config.training.seed,
        cutoff_len=d.cutoff_len,
        stage=get_stage(config),
        eos_id=tokenizer.eos_token_id,
        packing=bool(d.packing),
        skip_invalid=d.skip_invalid,
        shuffle_buffer=shuffle_buffer,
        pack_buffer=pack_buffer,
        name=f"dataset(s) '{d.dataset}'",
        explain=partial(locate_json_error, specs),
    )
    source.check_not_empty()
    return source, evals, source.stats

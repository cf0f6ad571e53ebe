"""Config -> tokenized training samples: the data pipeline end to end.

Per dataset: load rows -> convert each to a Conversation -> encode with the template -> one
sample (input_ids, labels); then mix datasets, split off validation, chunk (pt) or pack.
Encoding runs through `datasets.map`, so `preprocessing_num_workers` and `tokenized_path`
work as in LLaMA-Factory.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial

from megatune.config import Config
from megatune.data.processors import IGNORE, Sample, pack_samples, pretrain_samples, supervised_sample

ENCODED_COLUMNS = ("input_ids", "labels", "truncated", "error")
FINGERPRINT = "megatune_encoding.json"  # beside the cached dataset in tokenized_path


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


def _encode_row(row: dict, idx: int, spec, template, tokenizer, config: Config, file_label: str) -> dict:
    """One raw row -> encoded columns; errors are returned, not raised, so skip_invalid can count them."""
    from megatune.data.converters import to_conversation
    from megatune.data.registry import DataError

    d = config.data
    source = f"dataset '{spec.name}', {file_label}, row {idx}"
    try:
        conversation = to_conversation(row, spec, source, stage=config.training.stage)
        if config.training.stage == "pt":
            text = conversation.messages[-1].content
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ids, "labels": ids, "truncated": False, "error": ""}
        turns = template.encode(tokenizer, conversation, enable_thinking=d.enable_thinking)
        sample = supervised_sample(turns, d.cutoff_len, d.train_on_prompt, d.mask_history)
        if sample is None:
            raise DataError(f"{source}: nothing left to learn after truncation to cutoff_len={d.cutoff_len}")
        return {"input_ids": sample.input_ids, "labels": sample.labels, "truncated": sample.truncated, "error": ""}
    except DataError as err:
        return {"input_ids": [], "labels": [], "truncated": False, "error": str(err)}


def apply_config_template_eos(config: Config, tokenizer) -> str | None:
    """For sft with a named template: LLaMA-Factory's replace_eos on the tokenizer (see
    templates.apply_template_eos); returns a note when the eos changed."""
    from megatune.data.templates import apply_template_eos, get_template

    if config.training.stage != "sft" or not config.data.template or config.data.template == "auto":
        return None
    return apply_template_eos(tokenizer, get_template(config.data.template))


def encode_dataset(spec, rows, template, tokenizer, config: Config):
    workers = config.data.preprocessing_num_workers
    fn = partial(
        _encode_row,
        spec=spec,
        template=template,
        tokenizer=tokenizer,
        config=config,
        file_label=f"file {spec.file_name}",
    )
    return rows.map(
        fn,
        with_indices=True,
        num_proc=workers if workers and workers > 1 else None,
        remove_columns=rows.column_names,
        desc=f"Encoding {spec.name}",
    )


def encoding_fingerprint(config: Config, tokenizer) -> dict:
    """Everything the encoded rows depend on. Packing, chunking and the validation split happen
    after the cache, so they are free to change between runs."""
    d = config.data
    vocab = repr(sorted((str(token), index) for token, index in tokenizer.get_vocab().items()))
    return {
        "stage": config.training.stage,
        "dataset": d.dataset,
        "dataset_dir": os.path.abspath(d.dataset_dir),
        "template": d.template,
        "cutoff_len": d.cutoff_len,
        "max_samples": d.max_samples,
        "train_on_prompt": d.train_on_prompt,
        "mask_history": d.mask_history,
        "enable_thinking": d.enable_thinking,
        "mix_strategy": d.mix_strategy,
        "interleave_probs": d.interleave_probs,
        "seed": config.training.seed,
        "tokenizer": hashlib.sha256(
            (vocab + str(tokenizer.eos_token) + str(getattr(tokenizer, "chat_template", ""))).encode()
        ).hexdigest()[:16],
    }


def _load_cache(cache: str, fingerprint: dict):
    """The cached encoded set, if it was built with this run's settings; a DataError naming the
    settings that differ otherwise (never silently train on data encoded for another run)."""
    import datasets

    from megatune.data.registry import DataError

    path = os.path.join(cache, FINGERPRINT)
    if not os.path.isfile(path):
        raise DataError(
            f"tokenized_path {cache} holds no {FINGERPRINT}, so what it was encoded with is unknown "
            "(not written by megatune, or its save was interrupted); set overwrite_cache: true to encode "
            "into it again, or choose another tokenized_path"
        )
    with open(path) as f:
        saved = json.load(f)
    changed = [f"{key}: {saved.get(key)!r} there, {value!r} now" for key, value in fingerprint.items() if saved.get(key) != value]
    if changed:
        raise DataError(
            f"tokenized_path {cache} was encoded with other settings ({'; '.join(changed)}); set "
            "overwrite_cache: true to encode into it again, or choose another tokenized_path"
        )
    return datasets.load_from_disk(cache)


def load_encoded(config: Config, tokenizer, dataset_names: str | None = None):
    """The encoded, mixed datasets.Dataset (errors checked), from cache when tokenized_path has it."""
    from megatune.data.registry import DataError, load_rows, mix_datasets, resolve_datasets
    from megatune.data.templates import get_template

    d = config.data
    cache = d.tokenized_path if dataset_names is None else None  # the cache holds the training set
    fingerprint = encoding_fingerprint(config, tokenizer) if cache else None
    if cache and os.path.isdir(cache) and not d.overwrite_cache:
        return _load_cache(cache, fingerprint), 0
    names = dataset_names or d.dataset
    if not names:
        raise DataError("no dataset given: set `dataset:` in the YAML or pass --dataset NAME")
    template = get_template(d.template or "auto")
    parts = []
    for spec in resolve_datasets(names, d.dataset_dir):
        rows = load_rows(spec, d.dataset_dir)
        if d.max_samples is not None:
            rows = rows.select(range(min(d.max_samples, len(rows))))
        parts.append(encode_dataset(spec, rows, template, tokenizer, config))
    probs = [float(p) for p in d.interleave_probs.split(",")] if d.interleave_probs else None
    encoded = mix_datasets(parts, d.mix_strategy, probs, config.training.seed)
    errors = [e for e in encoded["error"] if e]
    if errors and not d.skip_invalid:
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise DataError(f"{errors[0]}{more}; fix the data or set skip_invalid: true to drop bad rows")
    encoded = encoded.filter(lambda e: not e, input_columns="error")
    if cache:
        if os.path.isfile(os.path.join(cache, FINGERPRINT)):
            os.remove(os.path.join(cache, FINGERPRINT))  # a cache being rewritten is not valid
        encoded.save_to_disk(cache)
        with open(os.path.join(cache, FINGERPRINT), "w") as f:  # last: marks the save complete
            json.dump(fingerprint, f, indent=1)
    return encoded, len(errors)


def _to_samples(encoded, config: Config, tokenizer, dropped: int = 0) -> tuple[list[Sample], DataStats]:
    d = config.data
    if config.training.stage == "pt":
        samples = pretrain_samples(encoded["input_ids"], tokenizer.eos_token_id, d.cutoff_len)
    else:
        samples = [
            Sample(ids, labels, truncated=trunc)
            for ids, labels, trunc in zip(encoded["input_ids"], encoded["labels"], encoded["truncated"])
        ]
    stats = DataStats(dropped=dropped, truncated=sum(s.truncated for s in samples))
    if d.packing and samples:
        samples = pack_samples(samples, d.cutoff_len)
        stats.packing_efficiency = sum(len(s.input_ids) for s in samples) / (len(samples) * d.cutoff_len)
    stats.samples = len(samples)
    stats.tokens = sum(len(s.input_ids) for s in samples)
    stats.loss_tokens = sum(sum(1 for t in s.labels if t != IGNORE) for s in samples)
    return samples, stats


def build_samples(config: Config, tokenizer, dataset_names: str | None = None) -> tuple[list[Sample], DataStats]:
    """All samples of the training datasets (chunked for pt, packed when asked), no split."""
    encoded, dropped = load_encoded(config, tokenizer, dataset_names)
    return _to_samples(encoded, config, tokenizer, dropped)


def build_train_eval(config: Config, tokenizer) -> tuple[list[Sample], list[Sample], DataStats]:
    """Training samples and validation samples: `eval_dataset` if given, else `val_size` split
    off the (encoded, mixed) training data with the run's seed."""
    from megatune.data.registry import split_validation

    encoded, dropped = load_encoded(config, tokenizer)
    if config.data.eval_dataset:
        train_rows, eval_rows = encoded, load_encoded(config, tokenizer, config.data.eval_dataset)[0]
    else:
        train_rows, eval_rows = split_validation(encoded, config.data.val_size, config.training.seed)
    train, stats = _to_samples(train_rows, config, tokenizer, dropped)
    evals = _to_samples(eval_rows, config, tokenizer)[0] if eval_rows is not None else []
    return train, evals, stats


def build_train_source(config: Config, tokenizer, global_batch_size: int):
    """What the trainer consumes: (a SampleSource over the training data, eval samples, stats).
    With `streaming: true` the source reads and encodes lazily (data larger than memory) and
    the stats cover what has been read so far; see data/streaming.py."""
    from megatune.data.source import MapSource

    if config.data.streaming:
        from megatune.data.streaming import build_stream_source

        return build_stream_source(config, tokenizer, global_batch_size)
    train, evals, stats = build_train_eval(config, tokenizer)
    return MapSource(train, global_batch_size, config.training.seed), evals, stats

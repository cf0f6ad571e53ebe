"""Config -> tokenized training samples, in memory.

Per dataset: load rows -> the training stage encodes each (data/encoding.py) -> mix datasets,
split off validation -> the stage turns encoded rows into samples (chunking for pt) -> pack.
Encoding runs through `datasets.map`, so `preprocessing_num_workers` and `tokenized_path`
work as in LLaMA-Factory. data/streaming.py is the lazy counterpart for data larger than memory.
"""

from __future__ import annotations

import hashlib
import json
import os

from megatune.config import Config
from megatune.data.encoding import (
    ENCODING_RULES,
    DataStats,
    RowEncoder,
    check_errors,
    interleave_probs,
    samples_from_rows,
)
from megatune.data.processors import Sample, pack_samples
from megatune.data.registry import DataError
from megatune.stages import get_stage

FINGERPRINT = "megatune_encoding.json"  # beside the cached dataset in tokenized_path


_clamp_said = False


def worker_count(requested: int | None, rows: int, name: str) -> int | None:
    """`preprocessing_num_workers` for a dataset of `rows` rows: at most one worker per row
    (datasets would warn and reduce it itself), said once per run; None for one process."""
    global _clamp_said
    if not requested or requested <= 1:
        return None
    if requested > rows:
        if not _clamp_said:
            print(f"megatune: preprocessing_num_workers={requested} is more than dataset {name}'s {rows} rows; "
                  f"using {max(rows, 1)} workers", flush=True)
            _clamp_said = True
        requested = rows
    return requested if requested > 1 else None


def encode_dataset(spec, rows, template, tokenizer, config: Config):
    """A datasets.Dataset of raw rows -> the stage's encoded columns + `error`."""
    import datasets

    workers = worker_count(config.data.preprocessing_num_workers, len(rows), spec.name)
    stage = get_stage(config)
    return rows.map(
        RowEncoder(stage, spec, template, tokenizer, config.data),
        with_indices=True,
        features=datasets.Features(stage.features) if stage.features else None,
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
        "encoding_rules": ENCODING_RULES,
        "stage": config.training.stage,
        "dataset": d.dataset,
        "dataset_dir": os.path.abspath(d.dataset_dir),
        "template": d.template,
        "cutoff_len": d.cutoff_len,
        "max_samples": d.max_samples,
        "train_on_prompt": d.train_on_prompt,
        "mask_history": d.mask_history,
        "enable_thinking": d.enable_thinking,
        **get_stage(config).fingerprint(),
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
    """(the encoded, mixed datasets.Dataset with bad rows removed, number of bad rows dropped),
    from cache when tokenized_path has it. Bad rows raise unless skip_invalid."""
    from megatune.data.registry import load_rows, mix_datasets, resolve_datasets
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
    encoded = mix_datasets(parts, d.mix_strategy, interleave_probs(d), config.training.seed)
    left_out = check_errors([e for e in encoded["error"] if e], d.skip_invalid, len(encoded))
    encoded = encoded.filter(lambda e: not e, input_columns="error")
    if cache:
        if os.path.isfile(os.path.join(cache, FINGERPRINT)):
            os.remove(os.path.join(cache, FINGERPRINT))  # a cache being rewritten is not valid
        encoded.save_to_disk(cache)
        with open(os.path.join(cache, FINGERPRINT), "w") as f:  # last: marks the save complete
            json.dump(fingerprint, f, indent=1)
    return encoded, left_out


def to_samples(encoded, config: Config, tokenizer, dropped: int = 0) -> tuple[list[Sample], DataStats]:
    """Good encoded rows (a datasets.Dataset or any iterable of row dicts) -> samples + stats."""
    d = config.data
    stats = DataStats(dropped=dropped)
    samples = list(samples_from_rows(encoded, get_stage(config), d.cutoff_len, tokenizer.eos_token_id, stats))
    if d.packing and samples:
        samples = pack_samples(samples, d.cutoff_len)
    for sample in samples:
        stats.add(sample, d.cutoff_len, bool(d.packing))
    return samples, stats


def build_samples(config: Config, tokenizer, dataset_names: str | None = None) -> tuple[list[Sample], DataStats]:
    """All samples of the training datasets (chunked for pt, packed when asked), no split."""
    encoded, dropped = load_encoded(config, tokenizer, dataset_names)
    return to_samples(encoded, config, tokenizer, dropped)


def build_train_eval(config: Config, tokenizer) -> tuple[list[Sample], list[Sample], DataStats]:
    """Training samples and validation samples: `eval_dataset` if given, else `val_size` split
    off the (encoded, mixed) training data with the run's seed."""
    from megatune.data.registry import split_validation

    encoded, dropped = load_encoded(config, tokenizer)
    if config.data.eval_dataset:
        train_rows, eval_rows = encoded, load_encoded(config, tokenizer, config.data.eval_dataset)[0]
    else:
        train_rows, eval_rows = split_validation(encoded, config.data.val_size, config.training.seed)
    train, stats = to_samples(train_rows, config, tokenizer, dropped)
    evals = to_samples(eval_rows, config, tokenizer)[0] if eval_rows is not None else []
    return train, evals, stats

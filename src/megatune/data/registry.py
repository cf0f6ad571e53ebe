"""Dataset registry: `dataset_info.json` entries -> `DatasetSpec` -> rows as a `datasets.Dataset`.

The file schema is LLaMA-Factory's, so a user's `dataset_dir` works unchanged. Only local
files are read (json, jsonl, csv, parquet, txt, or a folder of one of those); hub and script
entries are refused with a message that says so. Mixing and validation splits live here too.

Row numbers in error messages are 0-based indices into the loaded file; jsonl errors also
give the 1-based line number.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INFO_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt", "openai")
MIX_STRATEGIES = {"concat": None, "interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}
# file extension -> builder name of `datasets.load_dataset`
FILE_TYPES = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
KNOWN_KEYS = {"file_name", "formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags"}
KNOWN_KEYS |= set(REMOTE_KEYS)

# Default column and tag names, per formatting. Columns absent here are off unless configured.
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "openai": {"messages": "messages"},
}
# Preference (`ranking: true`) datasets of any formatting: the chosen and rejected answers.
# LLaMA-Factory has no default and requires `columns.chosen/rejected`; we default to these names.
RANKING_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}
DEFAULT_TAGS = {
    "sharegpt": {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "observation_tag": "observation",
        "function_tag": "function_call",
        "system_tag": "system",
    },
    "openai": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "observation_tag": "tool",
        "function_tag": "function_call",
        "system_tag": "system",
    },
}


class DataError(ValueError):
    """A problem with a dataset; the message names dataset, file, row (and line) and the fix."""


@dataclass
class DatasetSpec:
    """One `dataset_info.json` entry. `columns`/`tags` hold only what the file sets; use
    `column()` and `tag()` for the value with the formatting's default applied."""

    name: str
    file_name: str | None = None
    formatting: str = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    num_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    remote: dict[str, str] = field(default_factory=dict)  # hub/script entries, refused on load
    dataset_dir: str = ""

    def column(self, key: str) -> str | None:
        default = DEFAULT_COLUMNS.get(self.formatting, {}).get(key)
        if default is None and self.ranking:
            default = RANKING_COLUMNS.get(key)
        return self.columns.get(key) or default

    def tag(self, key: str) -> str | None:
        return self.tags.get(key) or DEFAULT_TAGS.get(self.formatting, {}).get(key)

    def path(self) -> Path:
        """The data file or folder on disk."""
        return Path(self.dataset_dir) / self.file_name if self.file_name else Path(self.dataset_dir)


# ---------------------------------------------------------------------------------------------
# dataset_info.json


def load_dataset_info(dataset_dir: str | os.PathLike) -> dict[str, DatasetSpec]:
    """Parse `<dataset_dir>/dataset_info.json` into specs, checking every entry's keys and types."""
    path = Path(dataset_dir) / INFO_FILE
    if not path.is_file():
        raise DataError(
            f"no {INFO_FILE} found: looked for {path.resolve()}; set `dataset_dir` to the folder "
            f"that holds it (it is 'data' by default)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object mapping dataset names to entries")
    return {name: _parse_entry(name, entry, path, str(dataset_dir)) for name, entry in raw.items()}


def _parse_entry(name: str, entry: Any, path: Path, dataset_dir: str) -> DatasetSpec:
    where = f"{path}, dataset '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry must be a JSON object")
    unknown = sorted(set(entry) - KNOWN_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(KNOWN_KEYS)}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: formatting '{formatting}' is not one of {list(FORMATTINGS)}")
    for key in ("columns", "tags"):
        value = entry.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise DataError(f"{where}: `{key}` must be an object of strings")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise DataError(f"{where}: `num_samples` must be a positive integer, got {num_samples!r}")
    remote = {k: entry[k] for k in REMOTE_KEYS if k in entry}
    if not remote and not entry.get("file_name"):
        raise DataError(f"{where}: no `file_name` given")
    return DatasetSpec(
        name=name,
        file_name=entry.get("file_name"),
        formatting=formatting,
        ranking=bool(entry.get("ranking", False)),
        subset=entry.get("subset"),
        split=entry.get("split", "train"),
        num_samples=num_samples,
        columns=dict(entry.get("columns", {})),
        tags=dict(entry.get("tags", {})),
        remote=remote,
        dataset_dir=dataset_dir,
    )


def resolve_datasets(names: str | list[str], dataset_dir: str | os.PathLike) -> list[DatasetSpec]:
    """Comma-separated dataset names (the YAML's `dataset:`) -> their specs, in order."""
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not wanted:
        raise DataError("no dataset name given: set `dataset:` to one or more names from dataset_info.json")
    info = load_dataset_info(dataset_dir)
    unknown = [n for n in wanted if n not in info]
    if unknown:
        raise DataError(
            f"unknown dataset(s) {unknown} in {Path(dataset_dir) / INFO_FILE}; "
            f"available: {', '.join(sorted(info)) or '(none)'}"
        )
    return [info[n] for n in wanted]


# ---------------------------------------------------------------------------------------------
# Loading rows


def data_files(spec: DatasetSpec) -> tuple[str, list[str]]:
    """(datasets builder name, list of files) for a local spec; refuses remote entries."""
    if spec.remote:
        keys = ", ".join(f"{k}={v!r}" for k, v in spec.remote.items())
        raise DataError(
            f"dataset '{spec.name}' points to a remote source ({keys}); megatune reads local files "
            f"only: download the data, put it under {spec.dataset_dir or '.'} and set `file_name`"
        )
    path = spec.path()
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"dataset '{spec.name}': folder {path} holds no data files")
    elif path.is_file():
        files = [str(path)]
    else:
        raise DataError(f"dataset '{spec.name}': file {path.resolve()} does not exist; check `file_name`")
    exts = {Path(f).suffix.lstrip(".").lower() for f in files}
    if len(exts) > 1:
        raise DataError(f"dataset '{spec.name}': folder {path} mixes file types {sorted(exts)}; use one type")
    ext = exts.pop()
    if ext not in FILE_TYPES:
        raise DataError(
            f"dataset '{spec.name}': file type '.{ext}' of {files[0]} is not supported; "
            f"use one of {', '.join('.' + e for e in FILE_TYPES)}"
        )
    return FILE_TYPES[ext], files


def load_rows(
    spec: DatasetSpec,
    dataset_dir: str | os.PathLike | None = None,
    *,
    streaming: bool = False,
    max_samples: int | None = None,
    seed: int = 42,
):
    """The raw rows of one dataset: a `datasets.Dataset` (an `IterableDataset` when streaming).

    `num_samples` from the spec picks that many rows deterministically (repeating the data when
    it asks for more than there are); `max_samples` then keeps the first rows only.
    """
    import datasets

    if dataset_dir is not None:
        spec.dataset_dir = str(dataset_dir)
    builder, files = data_files(spec)
    try:
        rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming)
    except Exception as err:  # noqa: BLE001 - re-raised with the file and line when we can find it
        if builder == "json":
            for f in files:
                check_json_file(spec, f)
        raise DataError(f"dataset '{spec.name}': could not read {', '.join(files)}: {err}") from err
    if builder == "text":  # blank lines of a text file are paragraph breaks, not documents
        rows = rows.filter(lambda t: bool(t.strip()), input_columns="text")
    if builder == "json" and not streaming and len(rows) == 0:
        raise DataError(f"dataset '{spec.name}': {', '.join(files)} holds no rows")
    if spec.num_samples is not None:
        rows = _sample(rows, spec.num_samples, seed, streaming)
    if max_samples is not None:
        rows = rows.take(max_samples) if streaming else rows.select(range(min(max_samples, len(rows))))
    return rows


def _sample(rows, n: int, seed: int, streaming: bool):
    """`n` rows: whole copies of the data plus a seeded, order-preserving subset of the rest."""
    if streaming:
        return rows.take(n)
    total = len(rows)
    picked = sorted(random.Random(seed).sample(range(total), n % total))
    return rows.select(list(range(total)) * (n // total) + picked)


def check_json_file(spec: DatasetSpec, file: str) -> None:
    """Locate a parse error (file, line, row) in a json/jsonl file; returns if it finds none."""
    text = Path(file).read_text(encoding="utf-8")
    if file.endswith(".jsonl"):
        row = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"dataset '{spec.name}', file {file}, row {row} (line {lineno}): invalid JSON "
                    f"at column {err.colno}: {err.msg}; fix or delete that line"
                ) from None
            if not isinstance(value, dict):
                raise DataError(
                    f"dataset '{spec.name}', file {file}, row {row} (line {lineno}): expected a JSON "
                    f"object, got {type(value).__name__}; every line must be one object"
                )
            row += 1
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"dataset '{spec.name}', file {file}: invalid JSON at line {err.lineno}, column "
            f"{err.colno}: {err.msg}; fix the file (each row must be an object in one top-level list)"
        ) from None
    if not isinstance(value, list):
        raise DataError(f"dataset '{spec.name}', file {file}: expected a top-level list of rows")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(
                f"dataset '{spec.name}', file {file}, row {i}: expected a JSON object, "
                f"got {type(item).__name__}"
            )


def describe_row(spec: DatasetSpec, index: int) -> str:
    """"dataset 'x', file f, row i" (plus the line for a single jsonl file), for error messages."""
    try:
        _, files = data_files(spec)
    except DataError:
        return f"dataset '{spec.name}', row {index}"
    if len(files) > 1:
        return f"dataset '{spec.name}', folder {spec.path()}, row {index}"
    where = f"dataset '{spec.name}', file {files[0]}, row {index}"
    if files[0].endswith(".jsonl") and spec.num_samples is None:
        seen = -1
        with open(files[0], encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                seen += bool(line.strip())
                if seen == index:
                    return f"{where} (line {lineno})"
    return where


# ---------------------------------------------------------------------------------------------
# Mixing and splitting


def mix_datasets(parts: list, strategy: str = "concat", probs: list[float] | None = None, seed: int = 42):
    """Combine datasets: `concat`, or interleave until the first (`interleave_under`) or
    every (`interleave_over`) dataset is used up, drawing by `probs` when given."""
    import datasets

    if strategy not in MIX_STRATEGIES:
        raise DataError(f"mix_strategy '{strategy}' is not one of {list(MIX_STRATEGIES)}")
    if not parts:
        raise DataError("no datasets to mix")
    if probs is not None:
        if strategy == "concat":
            raise DataError("interleave_probs needs mix_strategy interleave_under or interleave_over, not concat")
        if len(probs) != len(parts) or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise DataError(
                f"interleave_probs {probs} must hold one non-negative number per dataset "
                f"({len(parts)}) and sum to 1"
            )
    if len(parts) == 1:
        return parts[0]
    try:
        if strategy == "concat":
            return datasets.concatenate_datasets(parts)
        return datasets.interleave_datasets(
            parts, probabilities=probs, seed=seed, stopping_strategy=MIX_STRATEGIES[strategy]
        )
    except ValueError as err:
        raise DataError(f"cannot mix datasets ({strategy}): {err}; mix them after conversion") from err


def split_validation(dataset, val_size: float | int, seed: int = 42):
    """(train, validation) with `val_size` a fraction in (0, 1) or a row count; validation is
    None when val_size is 0. Streaming datasets take the first `val_size` rows (a count)."""
    if not val_size:
        return dataset, None
    if val_size < 0 or (isinstance(val_size, float) and val_size >= 1 and not val_size.is_integer()):
        raise DataError(f"val_size {val_size} must be a fraction in (0, 1) or a whole number of rows")
    count = int(val_size) if val_size >= 1 else None
    if not hasattr(dataset, "__len__"):  # streaming
        if count is None:
            raise DataError("val_size must be a row count (>= 1) with streaming: true")
        return dataset.skip(count), dataset.take(count)
    if count is not None and count >= len(dataset):
        raise DataError(f"val_size {count} leaves no training rows out of {len(dataset)}")
    parts = dataset.train_test_split(test_size=count if count is not None else val_size, seed=seed)
    return parts["train"], parts["test"]


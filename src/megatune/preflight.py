"""Checks run in the launcher before any worker starts, so that a bad dataset name, file,
column, template, model folder, tokenizer or Megatron setting fails in seconds, once, with every
problem listed, instead of after data encoding on every rank.

What only a worker can find (a bad row deep in a file, a shape mismatch while loading weights,
a non-finite loss) is reported through `megatune/failures.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatune.config import Config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def preflight_problems(config: Config, hf: dict | None) -> list[str]:
    """Every problem found in the run's inputs, one line each (empty when all is well).

    `hf` is the model's config.json as a dict (None when the folder has none: `validate` has
    reported that already). Reads at most the first row of each data file."""
    problems = _data_problems(config)
    if hf is not None:
        problems += model_problems(config, hf)
    return problems


def _data_problems(config: Config) -> list[str]:
    from megatune.data.registry import DataError, data_files, resolve_datasets
    from megatune.data.templates import get_template

    from megatune.stages import STAGES

    d = config.data
    stage = STAGES[config.training.stage]()  # only its column needs: nothing is loaded
    problems = []
    if config.training.stage != "pt" or d.template:
        try:
            get_template(d.template or "auto")
        except ValueError as err:
            problems.append(f"template: {err}")
    for key in ("dataset", "eval_dataset"):
        names = getattr(d, key)
        if names is None:
            if key == "dataset":
                problems.append("dataset: no dataset given; set `dataset:` to names from dataset_info.json")
            continue
        try:
            specs = resolve_datasets(names, d.dataset_dir)
        except DataError as err:
            problems.append(f"{key}: {err}")
            continue
        for spec in specs:
            try:
                builder, files = data_files(spec)
            except DataError as err:
                problems.append(str(err))
                continue
            first = _first_json_row(files[0]) if builder == "json" else None
            if first is not None:
                problems += _column_problems(spec, first, files[0], stage)
    return problems


def _first_json_row(file: str, max_bytes: int = 64 << 20) -> dict | None:
    """The first row of a .jsonl file (or of a .json list no bigger than `max_bytes`); None when
    it cannot be read cheaply. A file that does not parse is left to the loader, which names the line."""
    try:
        if file.endswith(".jsonl"):
            with open(file, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        return row if isinstance(row, dict) else None
            return None
        if Path(file).stat().st_size > max_bytes:
            return None
        rows = json.loads(Path(file).read_text(encoding="utf-8"))
        return rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else None
    except (OSError, ValueError):
        return None


def _column_problems(spec, row: dict, file: str, stage) -> list[str]:
    """Columns the stage needs in this format, and columns dataset_info.json names explicitly,
    must exist."""
    needed = stage.required_columns(spec)
    needed += [k for k in spec.columns if k not in needed]
    problems = []
    for key in needed:
        column = spec.column(key)
        if column is not None and column not in row:
            problems.append(
                f"dataset '{spec.name}', file {file}: no column '{column}' (the {key} of a {spec.formatting} "
                f"dataset); found columns {sorted(row)}; rename the data's column or set `columns.{key}` "
                f"of '{spec.name}' in dataset_info.json"
            )
    return problems


def model_problems(config: Config, hf: dict, need_tokenizer: bool = True) -> list[str]:
    """The tokenizer loads (when the command needs one: `verify` does not), the weight files'
    headers read, and Megatron accepts the model's TransformerConfig under this run's settings
    (its own checks run when it is built)."""
    from megatune.models import UnsupportedModelError, get_provider

    model_dir = config.model.model_name_or_path
    try:
        provider = get_provider(hf, f"{model_dir}/config.json")
    except UnsupportedModelError:
        provider = None  # `validate` says so
    vocab_size = provider.vocab_size(hf) if provider is not None else None
    problems = _tokenizer_problems(model_dir, vocab_size) if need_tokenizer else []
    problems += _weight_file_problems(model_dir)
    if provider is None:
        return problems
    try:
        from megatune.models.build import load_hf_config, transformer_config

        _, full_hf = load_hf_config(model_dir)
        transformer_config(config, full_hf, provider)
    except (ValueError, AssertionError, TypeError) as err:
        problems.append(f"Megatron refuses this model configuration: {err}")
    return problems


def _tokenizer_problems(model_dir: str, vocab_size: int | None = None) -> list[str]:
    """The tokenizer loads and every id it can produce has an embedding row (< vocab_size)."""
    try:
        from transformers import AutoTokenizer

        if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
            # transformers would quietly build an empty tokenizer from config.json alone
            raise FileNotFoundError(f"none of {', '.join(TOKENIZER_FILES)} is there")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001 - any failure here is "the tokenizer does not load"
        return [f"model_name_or_path: the tokenizer in {model_dir} does not load ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); the folder needs the tokenizer files"]
    if vocab_size is not None and len(tokenizer) > vocab_size:
        # ids from vocab_size on have no embedding row: an index error, or with a padded
        # vocabulary (layers/vocab_padding.py) a silent zero embedding and a wrong loss
        return [f"model_name_or_path: the tokenizer in {model_dir} has {len(tokenizer)} tokens but the model's "
                f"vocab_size is {vocab_size}, so ids from {vocab_size} on have no embedding row; use the "
                "tokenizer the model was trained with, or resize the model's embeddings first"]
    return []


def _weight_file_problems(model_dir: str) -> list[str]:
    """Every safetensors file the folder names exists and has a readable header."""
    from safetensors import safe_open

    from megatune.models.hf_io import CheckpointError, SafetensorsSource

    try:
        source = SafetensorsSource(model_dir)
    except CheckpointError as err:
        return [f"model_name_or_path: {err}"]
    except Exception as err:  # noqa: BLE001 - safetensors' own errors have no common base
        return [f"model_name_or_path: {model_dir}: weight file is not a readable safetensors file ({err})"]
    problems = []
    for path in sorted(set(source.file_of.values())):
        if not path.is_file():
            problems.append(f"model_name_or_path: {path} is named by the index but does not exist")
            continue
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001
            problems.append(f"model_name_or_path: {path} is not a readable safetensors file ({err})")
    return problems

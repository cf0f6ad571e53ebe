"""Reading and writing Hugging Face safetensors folders, slice by slice and shard by shard."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied verbatim from the source folder into an exported checkpoint.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",  # vision-language models' image processor
    "processor_config.json",
    "video_preprocessor_config.json",
)
WEIGHT_NAMES = "megatune_weight_names.json"  # a checkpoint's hf/ folder: the source's tensor names


class CheckpointError(ValueError):
    pass


class SafetensorsSource:
    """Random access to the tensors of an HF folder (single file or sharded with an index).

    `read` goes through `safe_open(...).get_slice`, so a rank that needs a quarter of a matrix
    reads a quarter of it from disk.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / WEIGHTS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: self.dir / fname for name, fname in weight_map.items()}
        elif (self.dir / SINGLE_FILE).is_file():
            with safe_open(self.dir / SINGLE_FILE, framework="pt") as f:
                self.file_of = {name: self.dir / SINGLE_FILE for name in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) or ["nothing usable"]
            raise CheckpointError(
                f"{self.dir}: no {SINGLE_FILE} or {WEIGHTS_INDEX} (found {', '.join(found)}); "
                "megatune reads safetensors: re-save the model with save_pretrained(safe_serialization=True)"
            )
        self._handles: dict[Path, object] = {}

    def _handle(self, name: str):
        if name not in self.file_of:
            raise CheckpointError(f"{self.dir}: checkpoint has no tensor '{name}'")
        path = self.file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def has(self, name: str) -> bool:
        return name in self.file_of

    def read_shape(self, name: str) -> list[int]:
        return self._handle(name).get_slice(name).get_shape()

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        sl = self._handle(name).get_slice(name)
        if dim is None:
            return sl[:]
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(start, stop)
        return sl[tuple(index)]


class ShardWriter:
    """Accumulates tensors and flushes a safetensors file whenever `max_bytes` is reached.

    Files get provisional names; `finalize_shards` renames them once every writer is done.
    """

    def __init__(self, out_dir: Path, prefix: str, max_bytes: int):
        self.out_dir, self.prefix, self.max_bytes = out_dir, prefix, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str], int]] = []  # (file, tensor names, bytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f"{self.prefix}-{len(self.files):05d}.safetensors.tmp"
        save_file(self.pending, str(self.out_dir / fname), metadata={"format": "pt"})
        self.files.append((fname, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0


def _plain_file_mode() -> int:
    """The mode a newly created file gets here (0o666 minus the umask, usually 0o644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def finalize_shards(out_dir: Path, files: list[tuple[str, list[str], int]]) -> None:
    """Give the provisional shard files their HF names and write the index. safetensors creates
    its files private (0600); they get the mode of their neighbours (config.json, ...)."""
    for fname, _, _ in files:
        os.chmod(out_dir / fname, _plain_file_mode())
    if len(files) == 1:
        os.replace(out_dir / files[0][0], out_dir / SINGLE_FILE)
        return
    weight_map, total = {}, 0
    for i, (fname, names, nbytes) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(out_dir / fname, out_dir / final)
        weight_map.update({name: final for name in names})
        total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


def write_side_files(src_dir: Path, out_dir: Path, dtype: torch.dtype | None) -> None:
    """config.json (with the exported dtype, unless None), generation config and tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((src_dir / "config.json").read_text())
    if dtype is not None:
        dtype_name = str(dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            config[key] = dtype_name
        for sub in ("text_config", "vision_config"):  # vision-language configs nest theirs
            if isinstance(config.get(sub), dict):
                config[sub]["dtype"] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name in SIDE_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)


def weight_names(folder: Path) -> list[str] | None:
    """The tensor names of the HF checkpoint `folder` (or recorded there by `record_weight_names`);
    None when it has neither. Families with several on-disk layouts pick their mappings by them."""
    if (folder / WEIGHT_NAMES).is_file():
        return json.loads((folder / WEIGHT_NAMES).read_text())
    try:
        return sorted(SafetensorsSource(folder).file_of)
    except CheckpointError:
        return None


def record_weight_names(src_dir: Path, out_dir: Path) -> None:
    """Keep the source checkpoint's tensor names beside a training checkpoint's config, so that
    an export from it writes the on-disk layout the run started from."""
    names = weight_names(src_dir)
    if names is not None:
        (out_dir / WEIGHT_NAMES).write_text(json.dumps(names))


def clear_old_weights(out_dir: Path) -> None:
    """Remove weights a previous export left, so a stale shard can't shadow the new ones."""
    for path in list(out_dir.glob("model*.safetensors*")):
        path.unlink()


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save a tokenizer changed for training (template eos) over the copied files, and make
    generation stop at its eos as well."""
    tokenizer.save_pretrained(str(folder))
    generation = folder / "generation_config.json"
    if generation.is_file():
        values = json.loads(generation.read_text())
        current = values.get("eos_token_id")
        ids = current if isinstance(current, list) else ([current] if current is not None else [])
        if tokenizer.eos_token_id not in ids:
            values["eos_token_id"] = [tokenizer.eos_token_id, *ids]
            generation.write_text(json.dumps(values, indent=2))

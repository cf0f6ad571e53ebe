"""`megatune export`: a training checkpoint -> a Hugging Face checkpoint, on any number of processes.

The checkpoint carries its resolved config and the HF config/tokenizer files (`hf/`), so nothing
else is needed. Megatron's distributed checkpoint is resharded on load, so the export layout
(`--nproc_per_node`, `--tensor_model_parallel_size`, `--pipeline_model_parallel_size`) need not
match the training layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from megatune.config import SECTIONS, Config, ConfigError, build_config
from megatune.engine.checkpoint import STATE_FILE

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# What the checkpoint's own config keeps: everything but the parallel layout and the run's paths.
_LAYOUT_KEYS = {f.name for f in SECTIONS["parallel"].__dataclass_fields__.values()}


def export_config(checkpoint_path: str, overrides: dict) -> Config:
    """The saved run config with the model pointed at the checkpoint's `hf/` folder and the
    parallel layout taken from the command line (default: one process)."""
    root = Path(checkpoint_path)
    if not (root / STATE_FILE).is_file() or not (root / "config.yaml").is_file():
        from megatune.engine.checkpoint import checkpoint_steps

        inside = checkpoint_steps(root)
        hint = (f"; it is a run folder: pass one of its checkpoints, e.g. --checkpoint_path "
                f"{root / f'checkpoint-{inside[-1]}'} (complete ones: "
                f"{', '.join(f'checkpoint-{s}' for s in inside)})" if inside else "")
        raise ConfigError([f"--checkpoint_path {checkpoint_path} is not a complete megatune checkpoint "
                           f"(expected {STATE_FILE} and config.yaml in it){hint}"])
    saved = yaml.safe_load((root / "config.yaml").read_text())
    values = {k: v for k, v in saved.items() if k not in _LAYOUT_KEYS}
    values["model_name_or_path"] = str(root / "hf")
    values["resume_from_checkpoint"] = None
    where = {k: str(root / "config.yaml") for k in values}
    for key, value in overrides.items():
        values[key] = value
        where[key] = "command line"
    return build_config(values, where)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError([f"--dtype {name} is not supported; choose one of: {', '.join(DTYPES)}"])
    return DTYPES[name]


def run_export(config: Config, checkpoint_path: str, output_path: str, dtype: torch.dtype | None) -> str:
    """Collective: build the model under the current layout, load the weights, write HF files."""
    from megatune.engine.checkpoint import load_model_only
    from megatune.models.build import build_model, param_dtype
    from megatune.models.weights import export_hf

    bundle = build_model(config, config.model.model_name_or_path)
    load_model_only(Path(checkpoint_path), bundle.chunks)
    export_hf(bundle, config.model.model_name_or_path, output_path, dtype or param_dtype(config))
    return output_path

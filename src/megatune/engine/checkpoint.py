"""Resumable training checkpoints: Megatron distributed checkpoints, written atomically.

Layout of `output_dir/checkpoint-N/`:
  model + optimizer   Megatron `dist_checkpointing` (torch_dist); the distributed optimizer's
                      state is saved per parameter ("fully_reshardable"), so a checkpoint can be
                      loaded with a different TP/PP/DP layout
  trainer_state.json  step, scheduler, data position, skipped-step counters, layout
  rng/rank_R.pt       python/numpy/torch/CUDA/Megatron-tracker RNG states of each rank
  config.yaml         the resolved run configuration
  hf/                 the HF config and tokenizer files, so `megatune export` needs nothing else

Atomicity: everything is written into `checkpoint-N.tmp`, and only when every rank has
finished does rank 0 rename it to `checkpoint-N` (a rename within one directory is atomic).
A crash mid-save leaves a `.tmp` folder that resume ignores and the next save removes; the
previous checkpoints are untouched. A shared filesystem across nodes is assumed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import tensor_parallel

from megatune.models.hf_io import record_weight_names, save_tokenizer, write_side_files

STATE_FILE = "trainer_state.json"
# The distributed optimizer's canonical per-parameter format: loadable under another TP/PP/DP
# layout. (Megatron's other reshardable format, fully_sharded_model_space, fails to save in 0.16.)
OPTIMIZER_FORMAT = "fully_reshardable"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(Exception):
    pass


@dataclass
class TrainerState:
    step: int = 0
    skipped_steps: int = 0
    consumed_samples: int = 0


def checkpoint_steps(output_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and (child / STATE_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def resolve_resume(value: str | None, output_dir: str) -> Path | None:
    """`resume_from_checkpoint`: a path, or `auto` for the latest complete one (None if none)."""
    if value is None:
        return None
    if value == "auto":
        steps = checkpoint_steps(output_dir)
        return Path(output_dir) / f"checkpoint-{steps[-1]}" if steps else None
    path = Path(value)
    # config.yaml too: a finished run's output_dir has a run-level trainer_state.json (the HF
    # Trainer's summary), which is not a checkpoint
    if not (path / STATE_FILE).is_file() or not (path / "config.yaml").is_file():
        raise ResumeError(
            f"resume_from_checkpoint: {value} is not a complete megatune checkpoint (no {STATE_FILE}); "
            f"complete ones in {output_dir}: {checkpoint_steps(output_dir) or 'none'}"
        )
    return path


def _model_state(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _sharded_state(chunks, optimizer, is_loading: bool) -> dict:
    state = _model_state(chunks)
    if optimizer is not None:
        model_sd = {k: v for d in state.values() for k, v in d.items()}
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_FORMAT}
        )
    return state


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: str,
    step: int,
    chunks,
    optimizer,
    scheduler,
    extra: dict,
    config,
    model_dir: str,
    save_total_limit: int | None,
    tokenizer=None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if dist.get_rank() == 0:
        for stale in root.glob("checkpoint-*.tmp"):
            shutil.rmtree(stale)  # a save that crashed earlier
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(chunks, optimizer, is_loading=False), str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        config.save(tmp / "config.yaml")
        write_side_files(Path(model_dir), tmp / "hf", None)
        record_weight_names(Path(model_dir), tmp / "hf")
        if tokenizer is not None:  # changed for training (template eos): export must carry it
            save_tokenizer(tokenizer, tmp / "hf")
        state = {
            **extra,
            "step": step,
            "scheduler": scheduler.state_dict(),
            "world_size": dist.get_world_size(),
        }
        with open(tmp / STATE_FILE, "w") as f:  # written last: marks the folder complete
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = root / f"checkpoint-{step}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        _rotate(root, save_total_limit, keep=step)
    dist.barrier()
    return final


def _rotate(root: Path, limit: int | None, keep: int) -> None:
    if not limit or limit < 1:
        return
    steps = [s for s in checkpoint_steps(root) if s != keep]
    for s in steps[: max(0, len(steps) + 1 - limit)]:
        shutil.rmtree(root / f"checkpoint-{s}")


def _allocate_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state yet, and Megatron's loading path (its
    `state_dict()`) asserts there is one. Allocate it with Megatron's own dummy step (zero
    gradients); every value is overwritten by the checkpoint right after."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def load_checkpoint(path: Path, chunks, optimizer, scheduler) -> dict:
    """Collective. Loads model (+ optimizer, scheduler, RNG when given) and returns the saved
    trainer state (step, data position, counters)."""
    state = json.loads((path / STATE_FILE).read_text())
    if optimizer is not None:
        _allocate_optimizer_state(optimizer)
    loaded = dist_checkpointing.load(_sharded_state(chunks, optimizer, is_loading=True), str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if state.get("world_size") == dist.get_world_size() and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def load_model_only(path: Path, chunks) -> None:
    """Collective: only the weights (for `megatune export`), any layout."""
    loaded = dist_checkpointing.load(_model_state(chunks), str(path))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=False)

"""Nothing lost, no raw tracebacks (issue 14): failing starts leave output_dir untouched, errors
across ranks end in one message, signals and broken pipes never stop a save."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatune.tiny import make_tiny_model
from tests.conftest import REPO, run_megatune

BASE = dict(
    stage="sft",
    dataset="megatune_identity",
    dataset_dir=str(REPO / "data"),
    template="qwen3_nothink",
    cutoff_len=64,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=1,
    learning_rate=1.0e-3,
    logging_steps=1,
    save_steps=1000,
    seed=7,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("qwen3", str(tmp_path_factory.mktemp("safety") / "tiny"), seed=3, with_tokenizer=True)


def write_config(folder: Path, model_dir, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = {**BASE, "model_name_or_path": model_dir, "output_dir": str(folder / "out"), **overrides}
    path = folder / f"run{len(list(folder.glob('run*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_output_dir_deletes_nothing_until_the_new_run_saves(tmp_path, model_dir):
    first = run_megatune("train", str(write_config(tmp_path, model_dir, max_steps=2, save_steps=2)))
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    before = snapshot(out)
    assert "checkpoint-2/trainer_state.json" in before and "trainer_log.jsonl" in before

    broken_model = tmp_path / "broken_model"
    shutil.copytree(model_dir, broken_model)
    (broken_model / "model.safetensors").write_bytes(b"not a safetensors file")
    failing = {
        "config": dict(max_steps=4, warmup_steps=4),  # found by the trainer, after the data
        "data": dict(dataset="no_such_dataset"),
        "template": dict(template="no_such_template"),
        "model": dict(model_name_or_path=str(broken_model)),
    }
    for kind, overrides in failing.items():
        result = run_megatune("train", str(write_config(tmp_path, model_dir, overwrite_output_dir=True, **overrides)))
        assert result.returncode != 0, (kind, result.stdout[-2000:])
        assert "Traceback" not in result.stderr, (kind, result.stderr[-3000:])
        assert snapshot(out) == before, kind

    # a run that saves takes the folder over: the old checkpoints and log rows go
    again = run_megatune("train", str(write_config(tmp_path, model_dir, overwrite_output_dir=True, max_steps=1, save_steps=1)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()] == [1]

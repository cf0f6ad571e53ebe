"""`megatune train` / `megatune export` end to end on CPU (2 gloo processes where parallel).

Ground truth is transformers: the first step's loss and gradient norm must equal those of the
HF model on the same global batch (token mean over all micro-batches and data-parallel ranks).

Runs without an injected fault or a signal are batched per world size (tests/multirun.py: one set
of worker processes runs every case of a batch in turn); each test asserts on its own case's
outputs. The others start `megatune` as a user does.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from megatune.tiny import make_tiny_model
from tests.conftest import REPO, run_megatune
from tests.multirun import Batches

BASE = dict(
    stage="sft",
    dataset="megatune_identity,megatune_chat",
    dataset_dir=str(REPO / "data"),
    template="qwen3_nothink",
    cutoff_len=96,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=2,
    learning_rate=1.0e-3,
    lr_scheduler_type="cosine",
    logging_steps=1,
    save_steps=1000,
    seed=7,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("qwen3", str(tmp_path_factory.mktemp("train") / "tiny"), seed=3, with_tokenizer=True)


def write_config(path, model_dir, **overrides):
    values = {**BASE, "model_name_or_path": model_dir, "output_dir": str(path / "out"), **overrides}
    config = path / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    return config, values


def log_rows(output_dir):
    lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def weights(folder) -> dict:
    """Every tensor of an HF folder, whatever its sharding."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def train(config, *args, timeout=900):
    result = run_megatune("train", str(config), *args, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def hf_step(model_dir, values, step: int):
    """Loss and grad norm transformers computes on the global batch of `step` (1-based)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatune.config import derive_layout, load_config
    from megatune.data.collator import collate
    from megatune.data.source import build_train_source

    config = load_config(None, values)
    layout = derive_layout(config, values["nproc_per_node"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source, _, _ = build_train_source(config, tokenizer, layout.global_batch_size)
    for _ in range(step):
        batch = source.next_global_batch()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    for sample in batch:
        b = collate([sample], tokenizer.pad_token_id)
        logits = model(input_ids=b.tokens).logits.float()
        losses = torch.nn.functional.cross_entropy(logits[0], b.labels[0], ignore_index=-100, reduction="sum")
        total, count = total + losses, count + int((b.labels != -100).sum())
    loss = total / count
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return loss.item(), norm.item(), count


LAYOUTS = {
    "dp2": dict(nproc_per_node=2),
    "tp2": dict(nproc_per_node=2, tensor_model_parallel_size=2),
    "tp2_sp": dict(nproc_per_node=2, tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(nproc_per_node=2, pipeline_model_parallel_size=2),
    # overlapped grad reduce / param gather (parameters arrive lazily) and full activation recompute
    "dp2_overlap_recompute": dict(nproc_per_node=2, overlap_grad_reduce=True, overlap_param_gather=True,
                                  recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "pp2_vpp2": dict(nproc_per_node=2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
}


TP2_SP = dict(nproc_per_node=2, tensor_model_parallel_size=2, sequence_parallel=True)
# small buckets: each layer's parameters gather, and its gradients reduce, on their own
OVERLAP = {"overlap": dict(overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=20000),
           "no-overlap": dict()}
RESUME = dict(max_steps=6, save_steps=3, val_size=4)
RESUMED = {"tp2": TP2_SP, "pp2": dict(nproc_per_node=2, pipeline_model_parallel_size=2)}
REFUSALS = {
    "stage: kto": (dict(stage="kto"), "stage='kto' is not supported; choose one of: pt, sft, dpo"),
    "lora": (dict(finetuning_type="lora"), "finetuning_type='lora' is not supported; choose one of: full"),
    "min_lr": (dict(max_steps=4, min_lr=1.0), "min_lr=1.0 is above learning_rate=0.001"),
    "do_train": (dict(do_train=False), "do_train: false"),
}


def refusal_case(name: str) -> str:
    return "refused-" + name.split(":")[0]


@pytest.fixture(scope="module")
def train_runs(model_dir, tmp_path_factory):
    """The batched runs of this file: the batches, and {case: YAML values} of the `train` cases.
    A case's folder is `root / case` (its run.yaml, output_dir `out`)."""
    root = tmp_path_factory.mktemp("train_runs")
    runs, values = Batches(root / "batches"), {}

    def add(name, *args, batch=None, after=(), prepare=None, **overrides):
        (root / name).mkdir(parents=True, exist_ok=True)
        config, values[name] = write_config(root / name, model_dir, **overrides)
        runs.add(name, ["train", config, *args], values[name].get("nproc_per_node", 1), batch, after, prepare)

    for layout, keys in LAYOUTS.items():
        add(f"layout-{layout}", learning_rate=0.0, max_steps=2, **keys)
    add("straight", eval_steps=3, plot_loss=True, report_to="tensorboard", **RESUME, **TP2_SP)
    for name, keys in OVERLAP.items():
        add(f"learning-dp2-{name}", max_steps=3, nproc_per_node=2, gradient_accumulation_steps=3, **keys)
    add("rotated", max_steps=3, save_steps=1, save_total_limit=2, nproc_per_node=2, tensor_model_parallel_size=2)
    checkpoint = root / "rotated" / "out" / "checkpoint-3"
    # first in its processes: the checkpoint load's warnings (none may show) are not yet said once
    runs.add("export-pp2", ["export", "--checkpoint_path", checkpoint, "--output_path", root / "pp2",
                            "--nproc_per_node", "2", "--pipeline_model_parallel_size", "2"], 2, "after2", ("world2",))

    def copy_checkpoint(name):
        return lambda: shutil.copytree(root / "straight" / "out" / "checkpoint-3",
                                       root / f"resumed-{name}" / "out" / "checkpoint-3")

    for name, layout in RESUMED.items():
        add(f"resumed-{name}", resume_from_checkpoint="auto", batch="after2", prepare=copy_checkpoint(name),
            **RESUME, **layout)
    runs.add("export-bf16", ["export", "--checkpoint_path", checkpoint, "--output_path", root / "bf16",
                             "--dtype", "bfloat16"], 1, after=("world2",))
    runs.add("export-run_folder", ["export", "--checkpoint_path", root / "rotated" / "out", "--output_path",
                                   root / "x"], 1)
    runs.add("export-int8", ["export", "--checkpoint_path", checkpoint, "--output_path", root / "x",
                             "--dtype", "int8"], 1)

    data = root / "pt_data"  # plain text for stage: pt
    data.mkdir()
    words = "the model learns from data one token at a time".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(40))} for i in range(30)]
    (data / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}}))
    add("pt", stage="pt", dataset="corpus", dataset_dir=str(data), cutoff_len=64, max_steps=3, template=None)

    for name, (overrides, _) in REFUSALS.items():
        add(refusal_case(name), **overrides)
    # an output_dir with checkpoints is neither silently continued nor overwritten
    (root / "refused-held" / "out" / "checkpoint-3").mkdir(parents=True)
    (root / "refused-held" / "out" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    add("refused-held")
    runs.add("refused-nowhere", ["train", root / "refused-held" / "run.yaml", "--resume_from_checkpoint",
                                 root / "nowhere"], 1)
    return runs, values, root


def finished(train_runs, name: str):
    """(result, output_dir) of a batched `train` case that must have succeeded."""
    runs, _, root = train_runs
    result = runs.get(name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result, root / name / "out"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_grad_norm_match_transformers_and_lr0_keeps_weights(train_runs, model_dir, layout):
    _, out = finished(train_runs, f"layout-{layout}")
    values = train_runs[1][f"layout-{layout}"]
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        ref_loss, ref_norm, ref_tokens = hf_step(model_dir, values, row["step"])
        assert row["loss_tokens"] == ref_tokens
        assert row["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert row["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    # learning_rate 0: the exported checkpoint holds exactly the input weights
    before, after = weights(model_dir), weights(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_overlapped_param_gather_trains_like_the_plain_data_parallel_step(train_runs, model_dir):
    """DP=2 with 3 micro-batches per step and the learning rate on: with the overlap options
    each bucket's gradients are reduce-scattered during the last micro-batch's backward, and the
    updated parameters arrive lazily, gathered bucket by bucket in DDP's forward pre-hooks of
    the next step. Every step must see the same parameters as without overlap; a stale shard
    would change the next losses by far more than the bucketed grad norm's summation order. The
    exported weights, which moved away from the initial ones, agree as well."""
    outs = {name: finished(train_runs, f"learning-dp2-{name}")[1] for name in OVERLAP}
    rows = {name: log_rows(out) for name, out in outs.items()}
    assert [r["step"] for r in rows["overlap"]] == [1, 2, 3]
    for got, want in zip(rows["overlap"], rows["no-overlap"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=0)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    initial, lazy, plain = weights(model_dir), weights(outs["overlap"]), weights(outs["no-overlap"])
    assert lazy.keys() == plain.keys() == initial.keys()
    assert all(not torch.equal(lazy[k], initial[k]) for k in initial)  # every tensor was updated
    for k in initial:
        torch.testing.assert_close(lazy[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_loss_falls_and_resume_is_exact(train_runs):
    """6 steps straight vs resuming from the straight run's step-3 checkpoint (the state an
    interrupted run leaves, bit for bit) with TP=2: identical per-step losses and grad norms.
    The same checkpoint also resumes under PP=2 (resharded), with matching losses."""
    _, out = finished(train_runs, "straight")
    rows = {r["step"]: r for r in log_rows(out)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[6]["loss"] < rows[1]["loss"]
    assert math.isfinite(rows[3]["eval_loss"]) and rows[6]["eval_loss"] < rows[3]["eval_loss"]
    assert (out / "training_loss.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([rows[s]["loss"] for s in range(1, 7)], rel=1e-6)
    assert [e.step for e in events.Scalars("eval_loss")] == [3, 6]

    for name in RESUMED:
        result, resumed = finished(train_runs, f"resumed-{name}")
        assert "resumed from" in result.stdout
        again = {r["step"]: r for r in log_rows(resumed)}
        assert sorted(again) == [4, 5, 6]
        for step in (4, 5, 6):
            if name == "tp2":
                assert again[step]["loss"] == rows[step]["loss"]
                assert again[step]["grad_norm"] == rows[step]["grad_norm"]
            else:  # another layout sums in another order
                assert again[step]["loss"] == pytest.approx(rows[step]["loss"], rel=1e-5)


def test_export_command_reshards_a_checkpoint(train_runs, model_dir):
    runs, _, root = train_runs
    _, out = finished(train_runs, "rotated")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # rotated
    result = runs.get("export-pp2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FutureWarning" not in result.stdout + result.stderr  # loading the checkpoint is quiet
    result = runs.get("export-bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    resharded = AutoModelForCausalLM.from_pretrained(str(root / "pp2")).state_dict()
    half = AutoModelForCausalLM.from_pretrained(str(root / "bf16"))
    assert all(torch.equal(final[k], resharded[k]) for k in final)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(torch.equal(final[k].bfloat16(), v) for k, v in half.state_dict().items())
    # the tokenizer travels with the checkpoint, with the template's eos (LLaMA-Factory's
    # replace_eos: the tiny base tokenizer ends with <|endoftext|>, qwen3_nothink answers with <|im_end|>)
    assert AutoTokenizer.from_pretrained(model_dir).eos_token == "<|endoftext|>"
    for folder in (out, root / "bf16", root / "pp2"):
        assert AutoTokenizer.from_pretrained(str(folder)).eos_token == "<|im_end|>"
    bad = runs.get("export-run_folder")
    assert bad.returncode == 2 and "is not a complete megatune checkpoint" in bad.stderr
    bad = runs.get("export-int8")
    assert bad.returncode == 2 and "--dtype int8 is not supported" in bad.stderr


def _script_run(tmp_path, model_dir, patch: str, *args, **overrides):
    """Run the trainer in one process with a fault injected by `patch` (Python source)."""
    config, _ = write_config(tmp_path, model_dir, **overrides)
    code = f"{patch}\nfrom megatune.cli import main\nraise SystemExit(main(['train', {str(config)!r}, *{list(args)!r}]))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


CRASH_IN_SAVE = """
import os, torch
_save = torch.save
def save(obj, path, *a, **k):
    if "checkpoint-4" in str(path):
        os._exit(9)  # killed after the model/optimizer files, before the save completes
    return _save(obj, path, *a, **k)
torch.save = save
"""


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, model_dir):
    crashed = _script_run(tmp_path, model_dir, CRASH_IN_SAVE, max_steps=6, save_steps=2, nproc_per_node=1)
    assert crashed.returncode == 9
    out = tmp_path / "out"
    assert (out / "checkpoint-4.tmp").is_dir() and not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    # resume 'auto' ignores the partial folder, continues from step 2 and cleans up
    result = train(tmp_path / "run.yaml", "--resume_from_checkpoint", "auto")
    assert f"resumed from {out / 'checkpoint-2'}" in result.stdout
    assert not (out / "checkpoint-4.tmp").exists() and (out / "checkpoint-6").is_dir()
    assert [r["step"] for r in log_rows(out)] == [1, 2, 3, 4, 5, 6]


NAN_LOSS = """
import math, torch
import megatune.stages.base as stage_module
_loss = stage_module.token_loss_sums
calls = [0]
def loss_func(losses, mask):
    calls[0] += 1
    loss, count, extra = _loss(losses, mask)
    if calls[0] > 2 and (BAD_UNTIL is None or calls[0] <= BAD_UNTIL):  # 2 micro-batches per step
        loss = loss * math.nan
        extra = {"sums": torch.stack([loss.detach(), count.float()])}
    return loss, count, extra
stage_module.token_loss_sums = loss_func
"""


def test_nonfinite_steps_are_skipped_and_too_many_stop_training(tmp_path, model_dir):
    (tmp_path / "once").mkdir()
    once = _script_run(tmp_path / "once", model_dir, "BAD_UNTIL = 4\n" + NAN_LOSS, max_steps=3)
    assert once.returncode == 0, once.stderr[-3000:]
    rows = log_rows(tmp_path / "once" / "out")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    # strict JSON: the skipped step's loss and grad norm are null, not NaN or step 1's norm
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in trainer_log.jsonl"))
              for line in (tmp_path / "once" / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert strict == rows
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None
    assert math.isfinite(rows[2]["loss"]) and math.isfinite(rows[2]["grad_norm"])
    assert "step 2: the loss is nan (not finite); update skipped (1 in a row)" in once.stdout

    (tmp_path / "always").mkdir()
    always = _script_run(tmp_path / "always", model_dir, "BAD_UNTIL = None\n" + NAN_LOSS, max_steps=10,
                         max_nonfinite_steps=3)
    assert always.returncode == 1, always.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient (last at step 4: the loss is nan (not finite)); stopping" in always.stderr


def test_sigterm_saves_at_the_step_boundary_and_exits(tmp_path, model_dir):
    config, _ = write_config(tmp_path, model_dir, max_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "megatune", "train", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "out" / "trainer_log.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    saved = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file()
    assert "checkpoint saved. Continue with --resume_from_checkpoint auto" in stdout


def test_refusals(train_runs):
    runs = train_runs[0]
    for name, (_, message) in REFUSALS.items():
        result = runs.get(refusal_case(name))
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert message in result.stderr, (name, result.stderr[-2000:])
    # an output_dir with checkpoints is neither silently continued nor overwritten
    result = runs.get("refused-held")
    assert result.returncode == 2 and "already holds checkpoints [3]; set resume_from_checkpoint: auto" in result.stderr
    result = runs.get("refused-nowhere")
    assert result.returncode == 2 and "is not a complete megatune checkpoint" in result.stderr


def test_pretraining_stage_packs_text_into_cutoff_blocks(train_runs):
    """stage: pt on plain text: every sequence is a full cutoff_len block, all tokens learned."""
    result, out = finished(train_runs, "pt")
    assert "truncated=0" in result.stdout
    rows = log_rows(out)
    # 2 sequences of 64 tokens per step, every position but each block's last is a target
    assert [r["loss_tokens"] for r in rows] == [2 * 63] * 3
    assert rows[-1]["loss"] < rows[0]["loss"]

"""A LLaMA-Factory user's first hour (issue 15): help for every command, the files LLaMA-Factory's
tools read, progress with a recent-pace ETA, experiment trackers, warmup as transformers counts
it, clear refusals, quiet and fast failures, `megatune env`, the quick start's plot."""

import datetime
import importlib.util
import json
import math
import os
import stat
import subprocess
import sys
import types

import pytest
import torch
import yaml

from megatune.tiny import make_tiny_model
from tests.conftest import REPO, run_megatune

COMMANDS = {  # command -> an argument its help must list
    "train": "docs/config.md",
    "verify": "--tolerance",
    "export": "--checkpoint_path",
    "data": "--output",
    "env": "usage: megatune env",
    "tiny-model": "--model_type",
}


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_has_help(flag):
    for command, needle in COMMANDS.items():
        result = run_megatune(command, flag, timeout=120)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert f"usage: megatune {command}" in result.stdout, (command, result.stdout)
        assert needle in result.stdout, (command, result.stdout)
    # help after a config file too (`megatune train run.yaml --help` is what people type)
    result = run_megatune("train", "run.yaml", "--help")
    assert result.returncode == 0 and "docs/config.md" in result.stdout


def test_version_and_unknown_env_arguments():
    from megatune import __version__

    result = run_megatune("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"megatune {__version__}"
    result = run_megatune("env", "--bogus")
    assert result.returncode == 2 and "megatune env takes no arguments" in result.stderr


def test_a_config_typo_fails_without_importing_torch(tmp_path):
    """The 5 s a typo used to cost were torch's and transformers' imports: neither may happen."""
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: x\nlearning_rat: 1.0e-3\n")
    code = ("import sys; from megatune.cli import main; rc = main(['train', sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'transformers', 'megatron') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "unknown key 'learning_rat'; did you mean 'learning_rate'?" in result.stderr
    assert "HEAVY []" in result.stdout


def test_hf_trainer_key_snapshot_is_the_installed_transformers():
    from megatune.config_keys import HF_TRAINER_KEYS, hf_trainer_keys

    assert set(HF_TRAINER_KEYS) == hf_trainer_keys()


def test_world_size_that_does_not_fit_suggests_nproc(tmp_path, megatune_in_process):
    model = make_tiny_model("qwen3", str(tmp_path / "tiny"), seed=0, with_tokenizer=True)
    result = megatune_in_process("verify", "--model_name_or_path", model, "--tensor_model_parallel_size", "2")
    assert result.returncode == 2
    assert "world size 1 is not divisible" in result.stderr and "--nproc_per_node 2" in result.stderr
    result = megatune_in_process("verify", "--model_name_or_path", model, "--nproc_per_node", "3",
                                 "--tensor_model_parallel_size", "2")
    assert result.returncode == 2 and "--nproc_per_node 4" in result.stderr


# ---------------------------------------------------------------------------- progress (units)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_eta_comes_from_the_recent_steps_not_from_start_up():
    from megatune.engine.metrics import RecentRate

    clock = FakeClock()
    rate = RecentRate(window=4, clock=clock)
    rate.start(0)
    assert rate.remaining(0, 10) is None
    clock.now += 60.0  # step 1: compilation, caches
    rate.tick(1)
    assert rate.remaining(1, 10) == pytest.approx(9 * 60.0)  # the only pace there is
    for step in range(2, 6):  # then 1 s per step
        clock.now += 1.0
        rate.tick(step)
    # a start-up average would say (64 s / 5 steps) x 5 = 64 s; the pace of steps 2..5 says 5 s
    assert rate.remaining(5, 10) == pytest.approx(5.0)
    assert rate.elapsed() == pytest.approx(64.0)
    for step in range(6, 10):  # the pace changes to 3 s per step: after `window` steps it is all that counts
        clock.now += 3.0
        rate.tick(step)
    assert rate.seconds_per_step() == pytest.approx(3.0)
    assert rate.remaining(9, 10) == pytest.approx(3.0)
    rate.start(20)  # a resumed run starts over
    assert rate.remaining(20, 30) is None


def test_llamafactory_fields_and_console_line():
    from megatune.engine.metrics import format_row, llamafactory_fields

    fields = llamafactory_fields(3, 8, 75.9, 3725.2)
    assert fields == {"current_steps": 3, "total_steps": 8, "percentage": 37.5,
                      "elapsed_time": "0:01:15", "remaining_time": "1:02:05"}
    assert llamafactory_fields(1, 3, 0.2, None)["percentage"] == 33.33
    row = {"step": 3, "total_steps": 8, "loss": 1.5, "tflops_per_gpu": 0.25, **fields}
    cpu_line = format_row(row, on_gpu=False, with_time=True)
    assert "TFLOP/s per CPU process 0.25" in cpu_line and "tflops_per_gpu" not in cpu_line
    assert "elapsed 0:01:15 | remaining 1:02:05" in cpu_line
    gpu_line = format_row(row, on_gpu=True, with_time=False)
    assert "tflops_per_gpu 0.25" in gpu_line and "remaining" not in gpu_line


# ------------------------------------------------------------------------ schedule and data


@pytest.mark.parametrize("total,warmup", [(1, dict(warmup_ratio=0.1)), (4, dict(warmup_steps=4)),
                                          (20, dict(warmup_ratio=0.26))])
def test_warmup_is_counted_as_transformers_counts_it(total, warmup):
    """max_steps: 1 with warmup_ratio: 0.1 is a 1-step warmup in transformers (ceil): allowed,
    with the same rates."""
    from transformers import TrainingArguments, get_scheduler

    from megatune.config import load_config
    from megatune.engine.optim import build_scheduler, schedule_problems, warmup_steps

    config = load_config(None, {"lr_scheduler_type": "cosine", "learning_rate": 1e-3, **warmup})
    hf_warmup = warmup.get("warmup_steps", warmup.get("warmup_ratio"))
    # transformers' own counting (5.x: a warmup_steps below 1 is a ratio); building TrainingArguments
    # needs accelerate, so the method runs on a stand-in holding the one field it reads
    args = types.SimpleNamespace(warmup_steps=hf_warmup)
    args.get_warmup_steps = lambda n: TrainingArguments.get_warmup_steps(args, n)
    assert warmup_steps(config, total) == args.get_warmup_steps(total)
    assert schedule_problems(config, total) == []

    class Optimizer:
        param_groups = [{"params": [], "lr": 0.0, "weight_decay": 0.0}]

    ours = build_scheduler(Optimizer(), config, total)
    param = torch.nn.Parameter(torch.zeros(1))
    reference_opt = torch.optim.SGD([param], lr=1e-3)
    reference = get_scheduler("cosine", reference_opt, num_warmup_steps=args.get_warmup_steps(total),
                              num_training_steps=total)
    for step in range(total):
        assert ours.get_lr(ours.optimizer.param_groups[0]) == pytest.approx(reference_opt.param_groups[0]["lr"],
                                                                            abs=1e-15), step
        ours.step(increment=1)
        reference_opt.step()
        reference.step()


def test_preprocessing_workers_are_clamped_to_the_rows_and_said_once(capsys, monkeypatch):
    from megatune.data import pipeline

    monkeypatch.setattr(pipeline, "_clamp_said", False)
    assert pipeline.worker_count(8, 3, "a") == 3
    assert pipeline.worker_count(8, 1, "b") is None  # one row: no worker processes at all
    assert pipeline.worker_count(2, 100, "c") == 2 and pipeline.worker_count(None, 5, "d") is None
    said = capsys.readouterr().out
    assert said.count("preprocessing_num_workers=8") == 1 and "dataset a's 3 rows; using 3 workers" in said


# --------------------------------------------------------------------------------- trackers


def test_report_to_names_are_supported_or_refused():
    from megatune.config import load_config
    from megatune.engine.tracking import parse_report_to, report_problems, resolve_all

    assert parse_report_to("none") == [] and parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert parse_report_to(load_config(None, {"report_to": ["tensorboard", "wandb"]}).training.report_to) == [
        "tensorboard", "wandb"]
    assert report_problems("tensorboard") == []
    (mlflow,) = report_problems("mlflow")
    assert "report_to: mlflow is not supported" in mlflow and "tensorboard, wandb and swanlab" in mlflow
    (typo,) = report_problems("wandbb")
    assert "unknown tracker 'wandbb'" in typo
    if importlib.util.find_spec("swanlab") is None:
        (missing,) = report_problems("swanlab")
        assert "pip install swanlab" in missing
    assert "tensorboard" in resolve_all(["all"])  # installed here (test extra)
    config = load_config(None, {"use_swanlab": True, "report_to": "tensorboard", "swanlab_run_name": "r1",
                                "swanlab_project": "p"})
    assert config.training.report_to == "tensorboard,swanlab" and config.training.run_name == "r1"


def test_swanlab_gets_the_rows_numbers_under_the_run_name(monkeypatch, tmp_path):
    """SwanLab is not installed here: a stand-in module records what megatune hands it."""
    from megatune.engine.tracking import open_trackers

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda data, step: calls.append(("log", data, step)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "swanlab", fake)
    (tracker,) = open_trackers("swanlab", str(tmp_path), "my-run", {"swanlab_project": "proj", "swanlab_mode": "offline"})
    tracker.log({"step": 2, "total_steps": 4, "loss": 1.25, "lr": 1e-3, "eval_loss": 2.0, "elapsed_time": "0:00:01",
                 "expert_load": {"layer 1": [0.5, 0.5]}, "grad_norm": None}, 2)
    tracker.close()
    init = calls[0][1]
    assert init["project"] == "proj" and init["experiment_name"] == "my-run" and init["mode"] == "offline"
    assert calls[1] == ("log", {"train/loss": 1.25, "train/lr": 1e-3, "eval/loss": 2.0}, 2)
    assert calls[2] == ("finish",)


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 1-process run of 4 steps: wandb offline (when installed), evaluation at the end,
    checkpoints at steps 2 and 4, resume_from_checkpoint: auto on an empty output_dir."""
    root = tmp_path_factory.mktemp("ux")
    model = make_tiny_model("qwen3", str(root / "tiny"), seed=1, with_tokenizer=True)
    has_wandb = importlib.util.find_spec("wandb") is not None
    values = dict(model_name_or_path=model, stage="sft", dataset="megatune_identity", dataset_dir=str(REPO / "data"),
                  template="qwen3_nothink", cutoff_len=64, per_device_train_batch_size=2, learning_rate=1e-3,
                  max_steps=4, warmup_ratio=0.1, logging_steps=1, save_steps=2, val_size=4, eval_steps=4,
                  eval_strategy="steps", plot_loss=True, seed=3, output_dir=str(root / "out"),
                  resume_from_checkpoint="auto", run_name="ux-run", report_to="wandb" if has_wandb else "none")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "megatune", "train", str(config)], capture_output=True,
                            text=True, timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root / "out", result, has_wandb


def test_run_prints_progress_and_keeps_running_log(finished_run):
    out, result, _ = finished_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("megatune: ")]
    assert any("resume_from_checkpoint: auto: no checkpoint in" in line and "starting from step 0" in line
               for line in lines)
    steps = [line for line in lines if line.startswith("megatune: step ")]
    assert len(steps) == 4
    for line in steps:  # no terminal here: every step line carries elapsed and remaining time
        assert "| elapsed 0:" in line and "| remaining 0:" in line
        assert "TFLOP/s per CPU process" in line and "tflops_per_gpu" not in line
    assert "global batch" in result.stdout  # a training run states its batch arithmetic
    running = (out / "running_log.txt").read_text().splitlines()
    assert all(line in running for line in lines), set(lines) - set(running)
    assert any(line.startswith("megatune: saved ") and line.endswith("checkpoint-2") for line in running)
    assert running[-1].startswith("megatune: done: 4 steps")


def test_trainer_log_carries_llamafactory_fields(finished_run):
    out, _, _ = finished_run
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["current_steps"] == r["step"] and r["total_steps"] == 4
        assert r["percentage"] == round(r["step"] / 4 * 100, 2)
        for key in ("elapsed_time", "remaining_time"):  # H:MM:SS, as str(timedelta) writes it
            h, m, s = (int(x) for x in r[key].split(":"))
            assert 0 <= m < 60 and 0 <= s < 60
        assert r["elapsed_time"] == str(datetime.timedelta(seconds=int(r["elapsed_s"])))
        assert math.isfinite(r["loss"]) and r["lr"] >= 0 and r["epoch"] > 0
    assert rows[-1]["remaining_time"] == "0:00:00" and rows[-1]["remaining_s"] == 0
    # LLaMA-Factory's web UI loss curve: current_steps and loss of the rows that have a loss
    steps = [r["current_steps"] for r in rows if r.get("loss")]
    assert steps == [1, 2, 3, 4]


def test_run_leaves_the_trainer_summary_files(finished_run):
    out, _, _ = finished_run
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    train = json.loads((out / "train_results.json").read_text())
    assert train["train_loss"] == pytest.approx(sum(r["loss"] for r in rows) / 4, rel=1e-9)
    assert train["epoch"] == pytest.approx(rows[-1]["epoch"])
    assert train["train_runtime"] > 0 and train["train_steps_per_second"] > 0 and train["total_flos"] > 0
    assert train["train_samples_per_second"] == pytest.approx(4 * 2 / train["train_runtime"], rel=1e-2)
    evals = json.loads((out / "eval_results.json").read_text())
    assert evals["eval_loss"] == pytest.approx(rows[-1]["eval_loss"])
    assert json.loads((out / "all_results.json").read_text()) == {**train, **evals}
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["max_steps"] == 4 and state["logging_steps"] == 1
    history = state["log_history"]
    # LLaMA-Factory's plot_loss: (step, value) of every log_history entry holding the key
    assert [(h["step"], h["loss"]) for h in history if "loss" in h] == [(r["step"], r["loss"]) for r in rows]
    assert [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h] == [(4, rows[-1]["eval_loss"])]
    assert all(h["learning_rate"] == r["lr"] for h, r in zip([h for h in history if "loss" in h], rows))
    assert history[-1]["train_loss"] == train["train_loss"]
    assert (out / "training_loss.png").stat().st_size > 1000


def test_exported_weights_have_their_neighbours_file_mode(finished_run):
    out, _, _ = finished_run
    weights = stat.S_IMODE((out / "model.safetensors").stat().st_mode)
    assert weights == stat.S_IMODE((out / "config.json").stat().st_mode)
    assert weights & stat.S_IRGRP  # not private (safetensors alone leaves 0600)


def test_export_on_a_run_folder_names_its_checkpoints(finished_run, tmp_path, megatune_in_process):
    out, _, _ = finished_run
    # refused by the command's own checks (in this process: no worker may start)
    result = megatune_in_process("export", "--checkpoint_path", str(out), "--output_path", str(tmp_path / "hf"))
    assert result.returncode == 2
    assert "it is a run folder" in result.stderr and "checkpoint-2, checkpoint-4" in result.stderr
    assert f"--checkpoint_path {out / 'checkpoint-4'}" in result.stderr
    assert "global batch" not in result.stdout


def test_wandb_offline_run_logs_the_rows(finished_run):
    out, _, has_wandb = finished_run
    if not has_wandb:
        pytest.skip("wandb is not installed")
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    (record,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb >= 0.2x has no Python reader for its record file (its core is in Go); the records are
    # uncompressed protobuf holding each logged value as JSON text, so look for exactly those
    data = record.read_bytes()
    assert b"ux-run" in data  # the run's name
    for row in rows:
        assert b"train/loss" in data and json.dumps(row["loss"]).encode() in data, row["step"]
        assert json.dumps(row["grad_norm"]).encode() in data, row["step"]
    assert b"eval/loss" in data and json.dumps(rows[-1]["eval_loss"]).encode() in data


def test_env_lists_what_a_bug_report_needs(megatune_env):
    import importlib.metadata

    result = megatune_env
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for dist, label in (("torch", "torch"), ("megatron-core", "megatron-core"), ("transformers", "transformers"),
                        ("datasets", "datasets")):
        assert f"{label}: {importlib.metadata.version(dist)}" in text
    assert f"(CUDA {torch.version.cuda or 'none'})" in text
    for piece in ("transformer-engine:", "matplotlib (plot_loss):", "tensorboard (report_to):", "wandb (report_to):",
                  "pillow (images): " + importlib.metadata.version("pillow"), "liger-kernel:", "GPU fast path",
                  "GPU: "):
        assert piece in text, piece


def test_quick_start_installs_what_its_example_uses():
    """The example ends with a loss plot (plot_loss: true), so the quick start installs the
    extra that carries matplotlib."""
    import tomllib

    example = yaml.safe_load((REPO / "examples" / "tiny_qwen3_sft.yaml").read_text())
    assert example["plot_loss"] is True
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for dep in extras["plot"])
    script = (REPO / "scripts" / "quickstart.sh").read_text()
    assert 'setup_env.sh "[plot]"' in script
    assert all(set(extras["plot"]) <= set(extras[name]) for name in ("test",))


def test_quick_start_example_runs_and_leaves_what_the_readme_promises(tmp_path):
    """The README's example config itself (cut to 6 steps, our own folders), with the tiny model
    the quick start makes: a Hugging Face checkpoint, trainer_log.jsonl and the loss plot."""
    from megatune.tiny import make_tiny_model

    model = make_tiny_model("qwen3", str(tmp_path / "tiny-qwen3"), with_tokenizer=True)
    out = tmp_path / "output"
    result = run_megatune("train", str(REPO / "examples" / "tiny_qwen3_sft.yaml"), "--nproc_per_node", "2",
                          "--model_name_or_path", model, "--output_dir", str(out), "--max_steps", "6",
                          "--dataset_dir", str(REPO / "data"))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_log.jsonl", "training_loss.png"):
        assert (out / name).is_file(), name
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # a loadable Hugging Face checkpoint

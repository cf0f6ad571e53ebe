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
from tests.multirun import Batches

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
    """The runs go in three batches (tests/multirun.py): the first run, the four failing starts,
    the run that saves."""
    runs = Batches(tmp_path / "batches")
    runs.add("first", ["train", write_config(tmp_path, model_dir, max_steps=2, save_steps=2)], 1, "first")
    out = tmp_path / "out"
    state = {}

    def take_snapshot():
        first = runs.get("first")
        assert first.returncode == 0, first.stderr[-3000:]
        state["before"] = snapshot(out)

    broken_model = tmp_path / "broken_model"
    shutil.copytree(model_dir, broken_model)
    (broken_model / "model.safetensors").write_bytes(b"not a safetensors file")
    failing = {
        "config": dict(max_steps=4, min_lr=1.0),  # found by the trainer, after the data (min_lr above the rate)
        "data": dict(dataset="no_such_dataset"),
        "template": dict(template="no_such_template"),
        "model": dict(model_name_or_path=str(broken_model)),
    }
    for kind, overrides in failing.items():
        runs.add(kind, ["train", write_config(tmp_path, model_dir, overwrite_output_dir=True, **overrides)], 1, "failing",
                 ("first",), take_snapshot)
    # a run that saves takes the folder over: the old checkpoints and log rows go
    runs.add("again", ["train", write_config(tmp_path, model_dir, overwrite_output_dir=True, max_steps=1, save_steps=1)],
             1, "again", ("failing",))

    for kind in failing:
        result = runs.get(kind)
        assert result.returncode != 0, (kind, result.stdout[-2000:])
        assert "Traceback" not in result.stderr, (kind, result.stderr[-3000:])
    before = state["before"]
    assert "checkpoint-2/trainer_state.json" in before and "trainer_log.jsonl" in before
    assert snapshot(out) == before  # after all four failing starts: not a byte changed

    again = runs.get("again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()] == [1]


def test_launcher_checks_data_template_model_and_megatron_before_workers_start(tmp_path, model_dir):
    """Everything checkable fails in the launcher, all problems at once, before any worker."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text(json.dumps({"question": "hi", "answer": "hello"}) + "\n")
    (data / "dataset_info.json").write_text(json.dumps({"qa": {"file_name": "rows.jsonl"}, "gone": {"file_name": "missing.jsonl"}}))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*"))
    config = write_config(tmp_path, str(no_tokenizer), nproc_per_node=2, dataset="qa,gone", dataset_dir=str(data),
                          template="no_such_template")
    started = time.time()
    result = run_megatune("train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("megatune: error: ") for line in lines), lines
    text = "\n".join(lines)
    for expected in ("unknown template 'no_such_template'",
                     "no column 'instruction' (the prompt of a alpaca dataset)",
                     "file " + str((data / "missing.jsonl").resolve()) + " does not exist",
                     "the tokenizer in " + str(no_tokenizer) + " does not load"):
        assert expected in text, (expected, text)
    assert "rank" not in text and time.time() - started < 120


def test_recompute_full_alone_recomputes_every_layer():
    from megatune.config import load_config

    config = load_config(None, {"recompute_granularity": "full"})
    assert (config.parallel.recompute_method, config.parallel.recompute_num_layers) == ("uniform", 1)
    assert "recompute_method: uniform, recompute_num_layers: 1" in config.notes[0]


# Injected into both workers through PYTHONPATH (they are fresh interpreters): rank 1 fails in
# its second step's loss, as a bug deep in training would.
FAIL_MID_TRAINING = """
import os
if os.environ.get("RANK") == "1":
    import megatune.stages.base as stage_module
    _loss = stage_module.token_loss_sums
    calls = [0]
    def token_loss_sums(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("injected failure in the loss")
        return _loss(*args, **kwargs)
    stage_module.token_loss_sums = token_loss_sums
"""


def _one_message(result, expected: str, code: int):
    assert result.returncode == code, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("megatune: error")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-4000:]
    assert "[rank" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-4000:]
    assert "Connection closed" not in result.stderr and "Connection reset" not in result.stderr, result.stderr[-4000:]


def test_a_worker_error_ends_every_rank_with_one_message(tmp_path, model_dir):
    # data: a bad row only a worker reads (preflight reads the first row only)
    data = tmp_path / "data"
    data.mkdir()
    def row(role):
        return {"conversations": [{"from": "human", "value": "hi"}, {"from": role, "value": "hello"}]}
    (data / "rows.jsonl").write_text("".join(json.dumps(row("gpt")) + "\n" for _ in range(6)) + json.dumps(row("robot")) + "\n")
    (data / "dataset_info.json").write_text(json.dumps({"qa": {"file_name": "rows.jsonl", "formatting": "sharegpt"}}))
    result = run_megatune("train", str(write_config(tmp_path / "d", model_dir, nproc_per_node=2, max_steps=2,
                                                    dataset="qa", dataset_dir=str(data))))
    _one_message(result, "row 6 (line 7)", 2)
    assert "Traceback" not in result.stderr

    # model: a weight file whose header reads but which lacks a tensor
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    result = run_megatune("train", str(write_config(tmp_path / "m", str(broken), nproc_per_node=2, max_steps=2)))
    _one_message(result, "model.layers.1.mlp.down_proj.weight", 2)
    assert "Traceback" not in result.stderr

    # mid-training: one rank raises inside a step; its traceback is shown once, the peer is quiet
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_MID_TRAINING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    config = write_config(tmp_path / "t", model_dir, nproc_per_node=2, max_steps=4)
    result = subprocess.run([sys.executable, "-m", "megatune", "train", str(config)], capture_output=True, text=True,
                            timeout=600, env=env, cwd=REPO)
    _one_message(result, "rank 1 failed: RuntimeError: injected failure in the loss", 1)
    assert result.stderr.count("Traceback") == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_a_signal_to_the_launcher_saves_even_with_stdout_gone(tmp_path, model_dir, signum):
    """`megatune train | tee log`, tee dies, then the scheduler's SIGTERM (or the user's Ctrl-C,
    SIGINT) reaches the launcher: both workers save, nobody crashes on the closed pipe, exit code
    128 + the signal, no traceback."""
    config = write_config(tmp_path, model_dir, nproc_per_node=2, max_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "megatune", "train", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 400
    for line in proc.stdout:  # training has started once a metric row is printed
        if "step 1/" in line or time.time() > deadline:
            break
    proc.stdout.close()  # the reader is gone: every later print hits a broken pipe
    proc.send_signal(signum)
    stderr = proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    saved = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.json").is_file()


def test_a_setting_only_megatron_checks_fails_in_the_launcher(tmp_path, megatune_in_process):
    """A setting our config accepts but Megatron's TransformerConfig refuses (padding expert
    inputs to a capacity that is not set) fails before any worker starts: one line, exit 2.
    (The launcher's checks run in this process: nothing may start a worker.)"""
    moe = make_tiny_model("qwen3_moe", str(tmp_path / "moe"), seed=3, with_tokenizer=True)
    config = write_config(tmp_path, moe, nproc_per_node=2, moe_pad_expert_input_to_capacity=True)
    result = megatune_in_process("train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines == ["megatune: error: Megatron refuses this model configuration: moe_expert_capacity_factor "
                     "must be set to use moe_pad_expert_input_to_capacity"], lines
    assert not (tmp_path / "out").exists()  # no worker ran


def _data_error(tmp_path, model_dir, lines: list[str], **entry) -> str:
    from transformers import AutoTokenizer

    from megatune.config import load_config
    from megatune.data.pipeline import build_samples
    from megatune.data.registry import DataError

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (data / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "rows.jsonl", "formatting": "sharegpt", **entry}}))
    config = load_config(None, {"dataset": "chat", "dataset_dir": str(data), "template": "qwen3_nothink",
                                "model_name_or_path": model_dir, "overwrite_cache": True})
    with pytest.raises(DataError) as info:
        build_samples(config, AutoTokenizer.from_pretrained(model_dir))
    return str(info.value)


def _chat_row(user="human", assistant="gpt") -> str:
    return json.dumps({"conversations": [{"from": user, "value": "hi"}, {"from": assistant, "value": "hello"}]})


def test_bad_jsonl_row_is_reported_by_its_line(tmp_path, model_dir):
    lines = [_chat_row(), "", _chat_row(), "   ", _chat_row(assistant="robot"), _chat_row()]
    message = _data_error(tmp_path, model_dir, lines)
    assert "row 2 (line 5)" in message and "message 1 has role 'robot'" in message, message


def test_every_row_failing_on_role_tags_points_at_the_tags_block(tmp_path, model_dir):
    lines = [_chat_row("user", "assistant") for _ in range(4)]  # openai-style roles, sharegpt's default tags
    message = _data_error(tmp_path, model_dir, lines)
    assert "message 0 has role 'user'" in message and "(and 3 more bad rows)" in message, message
    assert "`tags` block of 'chat' in dataset_info.json" in message, message
    assert "every row failed" in message and "set skip_invalid: true" not in message, message


def test_nonfinite_message_names_the_part_that_was_not_finite():
    from megatune.engine.step import StepResult
    from megatune.engine.trainer import LogWindow, nonfinite_message

    blown = StepResult({"loss": 7.6009}, 10.0, 20, None, skipped=True, nonfinite="gradients")
    assert nonfinite_message(2, blown) == "step 2: gradients not finite (the loss, 7.6009, is finite)"
    nan = StepResult({"loss": float("nan")}, 10.0, 20, None, skipped=True, nonfinite="loss")
    assert nonfinite_message(3, nan) == "step 3: the loss is nan (not finite)"
    # a log window holding only skipped steps has no gradient norm, not the previous window's
    window = LogWindow("loss_tokens")
    window.add(StepResult({"loss": 1.0}, 10.0, 20, 0.5, skipped=False), None)
    assert window.last_grad_norm == 0.5
    window.reset()
    window.add(blown, None)
    assert window.last_grad_norm is None


def test_trainer_log_is_strict_json(tmp_path):
    from megatune.engine.metrics import MetricsLog

    log = MetricsLog(str(tmp_path), "none", 0)
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "expert_load": {"layer 1": [float("nan"), 1.0]}})
    line = (tmp_path / "trainer_log.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {
        "step": 1, "loss": None, "grad_norm": None, "expert_load": {"layer 1": [None, 1.0]}}


def test_docs_config_table_is_the_config_registry():
    from megatune.config_keys import render_table

    text = (REPO / "docs" / "config.md").read_text()
    table = text.split("<!-- keys:start -->\n", 1)[1].split("<!-- keys:end -->", 1)[0]
    assert table == render_table(), "docs/config.md is stale: regenerate its table (see the file's header)"


def test_every_llamafactory_mcore_adapter_and_trainer_key_is_understood():
    """Each reference key is honoured, an alias, a no-op or refused with a reason: never unknown."""
    from megatune.config import KEYS
    from megatune.config_keys import LEAD_KEYS, LLAMAFACTORY_KEYS, MCORE_ADAPTER_KEYS, classify, hf_trainer_keys

    for key in sorted({*LLAMAFACTORY_KEYS, *MCORE_ADAPTER_KEYS, *LEAD_KEYS, *hf_trainer_keys()}):
        status, text = classify(key, "some value", set(KEYS))
        assert status != "unknown", key
        assert status == "honoured" or text, key


def test_llamafactory_example_keys_load_and_refusals_say_why():
    from megatune.config import ConfigError, load_config

    example = dict(dataloader_num_workers=4, save_only_model=False, flash_attn="auto", do_eval=True,
                   optim="adamw_torch", save_strategy="steps", run_name="x", torch_compile=False,
                   logging_first_step=True, gradient_checkpointing=True, moe_aux_loss_coef=0.01,
                   use_unsloth=False, lora_rank=None, overlap_p2p_comm=True, calculate_per_token_loss=True,
                   check_for_nan_in_loss_and_grad=True, ckpt_format="torch_dist", save_hf_model=True,
                   transformer_impl="local", accumulate_allreduce_grads_in_fp32=True)
    config = load_config(None, example)
    assert config.parallel.recompute_granularity == "full" and config.parallel.moe_aux_loss_coeff == 0.01
    noted = " ".join(config.notes)
    assert "dataloader_num_workers" in noted and "overlap_p2p_comm" in noted and "use_unsloth" not in noted
    with pytest.raises(ConfigError) as info:
        load_config(None, dict(save_strategy="epoch", use_audio_in_video=True, fp8="e4m3", lora_rank=8,
                               pipeline_model_parallel_layout="E,t|t,L", save_stratgy="steps"))
    problems = info.value.problems
    assert "key 'save_strategy' is not supported: value 'epoch': checkpoints are saved every save_steps" in problems[0]
    assert "use_audio_in_video" in problems[1]  # video/audio rows are refused (images are honoured)
    assert "Transformer Engine" in problems[2] and "full fine-tuning" in problems[3]
    assert "uneven pipeline splits" in problems[4]
    assert problems[5].endswith("unknown key 'save_stratgy'; did you mean 'save_strategy'?")
    assert not any("eval_strategy" in p for p in problems)


def test_transformer_engine_is_chosen_only_when_asked_and_refused_without_it():
    from megatune.config import ConfigError, load_config, validate
    from megatune.layers import spec

    assert load_config(None, {}).parallel.transformer_impl == "local"
    spec.set_transformer_impl("local")
    assert not spec.te_usable()  # never picked up just because it is installed
    if not spec.te_importable():
        config = load_config(None, {"transformer_impl": "transformer_engine"})
        with pytest.raises(ConfigError) as info:
            validate(config, 1)
        assert "transformer_impl: transformer_engine needs Transformer Engine" in info.value.problems[0]


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_start(tmp_path):
    """Token ids the model has no embedding row for would crash a worker (or, with a padded
    vocabulary, read a zero row and train on a wrong loss): the launcher refuses the pair."""
    from megatune.config import load_config
    from megatune.preflight import model_problems

    small = make_tiny_model("qwen3", str(tmp_path / "small"), seed=3, with_tokenizer=True, vocab_size=500)
    hf = json.loads((Path(small) / "config.json").read_text())
    problems = model_problems(load_config(None, {"model_name_or_path": small}), hf)
    assert problems == [f"model_name_or_path: the tokenizer in {small} has 512 tokens but the model's vocab_size "
                        "is 500, so ids from 500 on have no embedding row; use the tokenizer the model was "
                        "trained with, or resize the model's embeddings first"], problems
    assert model_problems(load_config(None, {"model_name_or_path": small}), hf, need_tokenizer=False) == []

"""Command line: `megatune train | export | verify | data | env | tiny-model`.

Distributed commands take an optional YAML file and `--key value` overrides. With
`--nproc_per_node N` (N > 1) and no external launcher, megatune re-runs itself in N processes.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatune.config import ConfigError, load_config, parse_overrides, read_hf_config, validate

USAGE = """usage: megatune <command> [CONFIG.yaml] [--key value ...]
       megatune <command> --help      the command's arguments
       megatune --version

commands:
  train        fine-tune (stage: sft, pt or dpo) from a LLaMA-Factory-style YAML; checkpoints into
               output_dir/checkpoint-N, a Hugging Face checkpoint into output_dir at the end
  export       convert a training checkpoint to a Hugging Face checkpoint:
               megatune export --checkpoint_path DIR --output_path DIR [--dtype bfloat16|float16|float32]
  env          print versions, devices and the kernels megatune will use
  verify       load an HF checkpoint into Megatron with the given layout and compare its
               logits with transformers' (prints max_abs_diff / mean_abs_diff; exit 1 if above
               tolerance). Extra options: --tolerance X, --export_path DIR (also export the
               loaded model back to HF format there)
  data         run the data pipeline with only the tokenizer and write the processed samples:
               megatune data CONFIG.yaml --output FILE.jsonl [--max_samples N]
  tiny-model   write a tiny random-weight HF model with an offline tokenizer:
               --model_type llama|qwen2|qwen3|qwen3_moe|qwen2_moe|mixtral|qwen2_vl|qwen2_5_vl --output_dir DIR
"""

_CONFIG_ARGS = """  CONFIG.yaml           optional LLaMA-Factory-style YAML file (one flat namespace of keys)
  --key value           any config key, overriding the YAML (--key=value and a bare --flag for
                        true also work); every key megatune knows, with its status, is in
                        docs/config.md
  --nproc_per_node N    start N local processes (under torchrun: join its job instead)
  -h, --help            this help"""

# `megatune <command> --help`: what each command takes.
COMMAND_HELP = {
    "train": f"""usage: megatune train [CONFIG.yaml] [--key value ...]

Full-parameter fine-tuning (stage: sft, pt or dpo). Checkpoints go to output_dir/checkpoint-N, a
Hugging Face checkpoint to output_dir at the end, metrics to output_dir/trainer_log.jsonl.

arguments:
{_CONFIG_ARGS}

keys most runs set: model_name_or_path, stage, dataset, dataset_dir, template, cutoff_len,
  output_dir, per_device_train_batch_size, gradient_accumulation_steps, learning_rate,
  num_train_epochs or max_steps, logging_steps, save_steps, bf16, report_to, run_name,
  tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel,
  resume_from_checkpoint (a checkpoint-N folder, or auto)
every config key (LLaMA-Factory's, Megatron's, the HF Trainer's; honoured, no-op or refused):
  docs/config.md; what a run writes and prints: docs/train.md""",
    "verify": f"""usage: megatune verify [CONFIG.yaml] --model_name_or_path DIR [--key value ...]

Load an HF checkpoint into Megatron with the given layout and compare its logits with
transformers' on fixed tokens; prints max_abs_diff / mean_abs_diff; exit code 1 above tolerance.

arguments:
{_CONFIG_ARGS}
  --tolerance X         pass/fail threshold on max_abs_diff (default: 1e-4 fp32, 0.25 bf16)
  --export_path DIR     also export the loaded model back to HF format there (a round-trip check)

layout keys: tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel,
  expert_model_parallel_size, bf16 (docs/verify.md)""",
    "export": """usage: megatune export --checkpoint_path DIR --output_path DIR [--dtype bfloat16|float16|float32]
                       [--nproc_per_node N --tensor_model_parallel_size T --pipeline_model_parallel_size P]

Convert a training checkpoint (output_dir/checkpoint-N) to a Hugging Face checkpoint. The
export layout need not match the training layout.

arguments:
  --checkpoint_path DIR   a checkpoint-N folder of a megatune run
  --output_path DIR       where the Hugging Face files go
  --dtype NAME            bfloat16, float16 or float32 (default: the training precision)
  --nproc_per_node N, --tensor_model_parallel_size T, --pipeline_model_parallel_size P
                          the layout used to load it (default: one process)
  -h, --help              this help""",
    "data": f"""usage: megatune data CONFIG.yaml --output FILE.jsonl [--max_samples N] [--key value ...]

Run the data pipeline with only the tokenizer and write the processed samples (input_ids,
labels; doc_lens when packing) as JSON lines; prints the statistics and the first sample with
the learned tokens highlighted (docs/data.md).

arguments:
{_CONFIG_ARGS.replace(chr(10) + "  --nproc_per_node N    start N local processes (under torchrun: join its job instead)", "")}
  --output FILE.jsonl   where the samples go (required)""",
    "env": """usage: megatune env

Print what a bug report needs: versions of megatune, Python, torch (and its CUDA), megatron-core,
transformers, datasets, Transformer Engine; which optional pieces are installed (matplotlib,
tensorboard, wandb, swanlab, pillow, liger-kernel, the GPU fast path); the devices (GPU model and
count) and which kernels megatune will use.

arguments:
  -h, --help            this help""",
}

# Options that belong to one command rather than to the run configuration.
COMMAND_OPTIONS = {
    "verify": {"tolerance": float, "export_path": str},
    "data": {"output": str},
    "export": {"checkpoint_path": str, "output_path": str, "dtype": str},
}


def _rank() -> int:
    """This process's rank, without importing torch when it is not loaded yet (a config typo
    must fail fast: importing torch alone takes seconds)."""
    if "torch.distributed" in sys.modules:
        from megatune.distributed import rank

        return rank()
    return int(os.environ.get("RANK", 0))


def _error(lines: list[str], code: int = 2) -> int:
    """Print a failure's lines (once: see `_fail` for workers) and return the exit code."""
    prefix = "megatune: error: " if _rank() == 0 else f"megatune: error [rank {_rank()}]: "
    for line in lines:
        print(prefix + line, file=sys.stderr)
    return code


def _fail(lines: list[str], code: int) -> int:
    """A worker's failure: under megatune's launcher, report it (the launcher prints it once)
    unless another rank failed first, then leave at once; otherwise print it."""
    from megatune import failures
    from megatune.distributed import rank

    if failures.failure_dir() is None:
        return _error(lines, code)
    if not failures.peer_failed(rank()):
        failures.report(rank(), lines, code)
    failures.exit_now(code)


def _split_command_options(command: str, overrides: dict) -> dict:
    extras = {}
    for key, kind in COMMAND_OPTIONS.get(command, {}).items():
        if key in overrides:
            try:
                extras[key] = kind(overrides.pop(key))
            except ValueError:
                raise ConfigError([f"command line: --{key} expects a {kind.__name__}"]) from None
    return extras


def _quiet_known_warnings() -> None:
    """Megatron warns at import that TE/Apex are missing; `megatune env` reports that properly.
    (torch itself is not imported here: see `_quiet_device_warnings`.)"""
    import warnings

    for pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                    ".*full scope is deprecated.*", ".*all_gather_into_tensor. is deprecated.*",
                    ".*reduce_scatter_tensor. is deprecated.*",
                    # Megatron's optimizer probes `.grad` on its fp32 main-param views
                    ".*The .grad attribute of a Tensor that is not a leaf Tensor.*",
                    # loading a checkpoint (resume, export): Megatron's dist_checkpointing calls torch's
                    # deprecated load_state_dict on ShardedTensors; nothing a user can act on
                    ".*`load_state_dict` is deprecated and will be removed.*",
                    ".*Please use DTensor instead and we are deprecating ShardedTensor.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _quiet_device_warnings() -> None:
    """Warnings that depend on the device; called once a worker imports torch anyway."""
    import warnings

    import torch

    if not torch.cuda.is_available():  # a GPU tuning hint, meaningless on CPU
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")


def main(argv: list[str] | None = None) -> int:
    from megatune.output import guard_output_streams

    guard_output_streams()  # a closed pipe (`| tee` ended by Ctrl-C) must never stop a save
    _quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "-V", "version"):
        from megatune import __version__

        print(f"megatune {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMAND_HELP and any(arg in ("-h", "--help") for arg in rest):
        print(COMMAND_HELP[command])
        return 0
    try:
        if command == "env":
            if rest:
                raise ConfigError([f"megatune env takes no arguments (got {' '.join(rest)}); see megatune env --help"])
            from megatune.env_report import env_lines

            print("\n".join(env_lines()))
            return 0
        if command == "tiny-model":
            return _tiny_model(rest)
        if command in ("verify", "train", "export"):
            return _distributed(command, rest, argv)
        if command == "data":
            return _data(rest)
    except ConfigError as err:
        from megatune.launch import under_launcher

        if under_launcher() and _rank() != 0:  # every rank found the same problem: rank 0 says it
            return 2
        return _error(err.problems)
    print(f"megatune: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


def _data(rest: list[str]) -> int:
    import json

    from megatune.data.registry import DataError

    yaml_path = rest[0] if rest and not rest[0].startswith("--") else None
    overrides = parse_overrides(rest[1:] if yaml_path else rest)
    extras = _split_command_options("data", overrides)
    config = load_config(yaml_path, overrides)
    if "output" not in extras:
        raise ConfigError(["megatune data needs --output FILE.jsonl"])
    if config.model.model_name_or_path is None:
        raise ConfigError(["model_name_or_path is required: a folder with the tokenizer files"])
    from transformers import AutoTokenizer

    from megatune.data.preview import render
    from megatune.stages import get_stage

    tokenizer = AutoTokenizer.from_pretrained(config.model.model_name_or_path)
    first, count = None, 0
    try:
        note = get_stage(config).prepare_tokenizer(config, tokenizer)
        if note:
            print(f"megatune: {note}")
        samples, stats = _data_samples(config, tokenizer)
        with open(extras["output"], "w") as f:  # written as read: a stream never sits in memory
            for s in samples:
                row = {f"{side}_{k}" if side else k: v for side, part in _parts(s) for k, v in
                       (("input_ids", part.input_ids), ("labels", part.labels))}
                if config.data.packing:
                    row["doc_lens"] = s.doc_lens
                f.write(json.dumps(row) + "\n")
                first, count = first or s, count + 1
    except (DataError, ValueError) as err:
        return _error([str(err)])
    print(f"wrote {count} samples to {extras['output']}")
    print(stats.line())
    if first is not None:
        print("first sample (learned tokens highlighted):")
        for side, part in _parts(first):
            print(f"{side}: {render(part, tokenizer)}" if side else render(part, tokenizer))
    return 0


def _parts(sample) -> list[tuple[str, object]]:
    """(name, Sample) of what a sample holds: itself, or a preference pair's two sides."""
    if hasattr(sample, "chosen"):
        return [("chosen", sample.chosen), ("rejected", sample.rejected)]
    return [("", sample)]


def _data_samples(config, tokenizer):
    """(iterable of processed samples, their stats): the whole list, or with `streaming: true`
    one pass over the stream in file order (stats fill in as it is read). Neither splits off
    validation data."""
    from dataclasses import replace

    from megatune.data.pipeline import build_samples

    if not config.data.streaming:
        return build_samples(config, tokenizer)
    from megatune.data.streaming import build_stream_source

    config = replace(config, data=replace(config.data, val_size=0.0, eval_dataset=None))
    source, _, stats = build_stream_source(config, tokenizer, 1, shuffle_buffer=1)
    return source.epoch_samples(), stats


def _tiny_model(rest: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="megatune tiny-model",
        description="Write a tiny random-weight Hugging Face model with an offline tokenizer (for tests and the quick start).")
    parser.add_argument("--model_type", default="qwen3", help="the model family (default: qwen3)", choices=["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--output_dir", required=True, help="folder to write the model into")
    parser.add_argument("--tie_word_embeddings", default="false", choices=["true", "false"],
                        help="share the input embedding with the output layer (default: false)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args(rest)
    from megatune.tiny import make_tiny_model

    make_tiny_model(args.model_type, args.output_dir, seed=args.seed, with_tokenizer=True,
                    tie_word_embeddings=args.tie_word_embeddings == "true")
    print(f"wrote a tiny {args.model_type} model to {args.output_dir}")
    return 0


def _distributed(command: str, rest: list[str], argv: list[str]) -> int:
    from megatune.launch import CHECKED_ENV, launch_workers, under_launcher

    yaml_path = rest[0] if rest and not rest[0].startswith("--") else None
    overrides = parse_overrides(rest[1:] if yaml_path else rest)
    extras = _split_command_options(command, overrides)
    if command == "export":
        config = _export_config(yaml_path, extras, overrides)
    else:
        config = load_config(yaml_path, overrides)
    if config.model.model_name_or_path is None:
        raise ConfigError(["model_name_or_path is required (YAML key or --model_name_or_path DIR)"])
    world = int(os.environ["WORLD_SIZE"]) if under_launcher() else config.parallel.nproc_per_node
    hf = read_hf_config(config.model.model_name_or_path) if os.path.isdir(config.model.model_name_or_path) else None
    layout = validate(config, world, hf)
    if command in ("train", "verify") and not os.environ.get(CHECKED_ENV):
        from megatune.preflight import preflight_problems

        problems = preflight_problems(config, hf) if command == "train" else []
        if command == "train":
            from megatune.engine.tracking import report_problems

            problems += report_problems(config.training.report_to)
        if command == "verify" and hf is not None:
            from megatune.preflight import model_problems

            problems = model_problems(config, hf, need_tokenizer=False)
        if problems:
            raise ConfigError(problems)
    if not under_launcher() and world > 1:
        return launch_workers(world, argv)
    return _run_worker(command, config, layout, extras)


def _say_model_notes(config) -> None:
    """The model family's start-up lines (e.g. which expert implementation computes a MoE and
    how hard its load-balancing loss pushes: never a silent slow path)."""
    from megatune.models import get_provider

    hf = read_hf_config(config.model.model_name_or_path)
    for line in get_provider(hf).startup_notes(hf, config):
        print(f"megatune: {line}", flush=True)


def _export_config(yaml_path, extras: dict, overrides: dict):
    from megatune.export import export_config, parse_dtype

    missing = [f"--{key}" for key in ("checkpoint_path", "output_path") if key not in extras]
    if yaml_path or missing:
        raise ConfigError([
            "usage: megatune export --checkpoint_path DIR --output_path DIR [--dtype bfloat16|float16|float32] "
            "[--nproc_per_node N --tensor_model_parallel_size T --pipeline_model_parallel_size P]"
            + (f" (missing {', '.join(missing)})" if missing else "")
        ])
    parse_dtype(extras.get("dtype"))  # reject a bad dtype before any process starts
    return export_config(extras["checkpoint_path"], overrides)


def _run_worker(command, config, layout, extras) -> int:
    from megatune import failures
    from megatune.data.registry import DataError
    from megatune.distributed import init_distributed, is_rank0, rank, shutdown
    from megatune.engine.checkpoint import ResumeError
    from megatune.engine.trainer import TrainingError
    from megatune.models.hf_io import CheckpointError
    from megatune.models.provider import UnsupportedModelError

    stopped = _quiet_signals()
    _quiet_device_warnings()
    try:
        init_distributed(layout, config.training.seed, config.training.ddp_timeout)
        if is_rank0():
            # the batch arithmetic only means something to a training run
            print(f"megatune: {layout.describe(with_batch=command == 'train')}", flush=True)
            for note in config.notes:
                print(f"megatune: {note}", flush=True)
            _say_model_notes(config)
        if command == "verify":
            return _verify(config, extras)
        if command == "train":
            from megatune.engine.trainer import train

            return train(config, layout)
        if command == "export":
            from megatune.export import parse_dtype, run_export

            out = run_export(config, extras["checkpoint_path"], extras["output_path"], parse_dtype(extras.get("dtype")))
            if is_rank0():
                print(f"megatune: exported {extras['checkpoint_path']} to {out}", flush=True)
            return 0
        raise AssertionError(command)
    except _Stopped as err:  # a signal before training started: nothing to save
        if is_rank0():
            print(f"megatune: stopped by signal {err.signum} before training started; nothing saved", file=sys.stderr)
        failures.exit_now(128 + err.signum)
    except ConfigError as err:
        return _fail(err.problems, 2)
    except TrainingError as err:
        return _fail([str(err)], 1)
    except (UnsupportedModelError, CheckpointError, ValueError, DataError, ResumeError) as err:
        return _fail([str(err)], 2)
    except Exception:
        if failures.failure_dir() is None:
            raise
        if failures.peer_failed(rank()):  # e.g. "connection closed": a peer failed first
            failures.exit_now(1)
        import traceback

        text = traceback.format_exc()
        last = text.strip().splitlines()[-1]
        failures.report(rank(), [f"rank {rank()} failed: {last} (traceback above)"], 1, text)
        failures.exit_now(1)
    finally:
        stopped.restore()
        shutdown()


class _Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _quiet_signals:
    """Until training installs its own handler (save at the step boundary), SIGINT/SIGTERM end
    the worker cleanly: no KeyboardInterrupt traceback, exit code 128 + signal."""

    def __init__(self):
        import signal

        def stop(signum, frame):
            raise _Stopped(signum)

        self.previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _verify(config, extras) -> int:
    from megatune.distributed import is_rank0
    from megatune.models.build import build_model, param_dtype
    from megatune.verify import run_verify

    model_dir = config.model.model_name_or_path
    bundle = build_model(config, model_dir)
    result = run_verify(
        bundle,
        model_dir,
        param_dtype(config),
        extras.get("tolerance"),
        export_path=extras.get("export_path"),
    )
    if is_rank0():
        print(result.line(), flush=True)
    return 0 if result.passed else 1

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

commands:
  train        fine-tune (stage: sft or pt) from a LLaMA-Factory-style YAML; checkpoints into
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

# Options that belong to one command rather than to the run configuration.
COMMAND_OPTIONS = {
    "verify": {"tolerance": float, "export_path": str},
    "data": {"output": str},
    "export": {"checkpoint_path": str, "output_path": str, "dtype": str},
}


def _error(lines: list[str], code: int = 2) -> int:
    """Print a failure's lines (once: see `_fail` for workers) and return the exit code."""
    from megatune.distributed import rank

    prefix = "megatune: error: " if rank() == 0 else f"megatune: error [rank {rank()}]: "
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
    """Megatron warns at import that TE/Apex are missing; `megatune env` reports that properly."""
    import warnings

    for pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                    ".*full scope is deprecated.*", ".*all_gather_into_tensor. is deprecated.*",
                    ".*reduce_scatter_tensor. is deprecated.*",
                    # Megatron's optimizer probes `.grad` on its fp32 main-param views
                    ".*The .grad attribute of a Tensor that is not a leaf Tensor.*"):
        warnings.filterwarnings("ignore", message=pattern)
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
    command, rest = argv[0], argv[1:]
    try:
        if command == "env":
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
        from megatune.distributed import rank
        from megatune.launch import under_launcher

        if under_launcher() and rank() != 0:  # every rank found the same problem: rank 0 says it
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
    parser = argparse.ArgumentParser(prog="megatune tiny-model")
    parser.add_argument("--model_type", default="qwen3", choices=["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tie_word_embeddings", default="false", choices=["true", "false"])
    parser.add_argument("--seed", type=int, default=0)
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
        if command == "verify" and hf is not None:
            from megatune.preflight import _model_problems

            problems = _model_problems(config, hf)
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
    try:
        init_distributed(layout, config.training.seed, config.training.ddp_timeout)
        if is_rank0():
            print(f"megatune: {layout.describe()}", flush=True)
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

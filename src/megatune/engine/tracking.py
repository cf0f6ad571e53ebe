"""Experiment trackers behind `report_to`: TensorBoard, Weights & Biases, SwanLab.

Each gets the same numbers as `trainer_log.jsonl` (one call per row, at the row's step), only on
rank 0 (the trainer creates them there and nowhere else). Names follow the Hugging Face Trainer's
integrations: training fields under `train/<field>`, evaluation fields `eval_<name>` under
`eval/<name>`. The run's name is `run_name` (as in the HF Trainer); W&B's project comes from
`WANDB_PROJECT` (default "megatune") and SwanLab's from `swanlab_project`.

Importing this module imports no tracker: a missing package is found by `report_problems`
(before any work starts) with `importlib.util.find_spec`, and each tracker is imported only when
a run opens it.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

# report_to value -> the package it needs
SUPPORTED = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab"}
# What the HF Trainer also accepts but megatune does not send metrics to; refused, never ignored.
NOT_SUPPORTED = ("mlflow", "comet_ml", "clearml", "neptune", "dvclive", "azure_ml", "codecarbon",
                 "flyte", "dagshub", "trackio")
# Keys of a metrics row that are positions, not metrics.
_POSITION_KEYS = ("step", "total_steps", "current_steps", "percentage")


def parse_report_to(value: str | None) -> list[str]:
    """`report_to` (a name, "none", "all", or a comma-separated list as the YAML list becomes)
    -> the tracker names, in order, without duplicates; "none" gives []. "all" stays "all"
    (resolved by `resolve_all` when the run starts, as the HF Trainer does)."""
    if value is None:
        return []
    names = []
    for part in str(value).replace("[", "").replace("]", "").split(","):
        name = part.strip().strip("'\"").lower()
        if name and name != "none" and name not in names:
            names.append(name)
    return names


def report_problems(value: str | None) -> list[str]:
    """Problems with `report_to`, each naming the value and what to do: an unknown or
    unsupported tracker, or a supported one whose package is not installed."""
    problems = []
    for name in parse_report_to(value):
        if name == "all":
            continue
        if name in NOT_SUPPORTED:
            problems.append(f"report_to: {name} is not supported; megatune reports to tensorboard, wandb and "
                            "swanlab (and always writes output_dir/trainer_log.jsonl)")
        elif name not in SUPPORTED:
            problems.append(f"report_to: unknown tracker '{name}'; choose from none, all, "
                            + ", ".join(SUPPORTED))
        elif importlib.util.find_spec(SUPPORTED[name]) is None:
            problems.append(f"report_to: {name} needs the {SUPPORTED[name]} package (pip install {SUPPORTED[name]}); "
                            f"or remove {name} from report_to")
    return problems


def resolve_all(names: list[str]) -> list[str]:
    """"all" -> every supported tracker whose package is installed (the HF Trainer's meaning)."""
    if "all" not in names:
        return names
    installed = [n for n, package in SUPPORTED.items() if importlib.util.find_spec(package) is not None]
    return [n for n in names if n != "all"] + [n for n in installed if n not in names]


def scalars(row: dict) -> dict[str, float]:
    """A metrics row -> {tracker name: value}: finite numbers only (a skipped step's null loss and
    nested fields such as `expert_load` are left out), positions dropped, HF Trainer names."""
    out = {}
    for key, value in row.items():
        if key in _POSITION_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


class TensorBoardTracker:
    """Events under output_dir/runs; tags `train/<field>` and `eval_<name>`."""

    name = "tensorboard"

    def __init__(self, output_dir: str, run_name: str | None, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "runs"))

    def log(self, row: dict, step: int) -> None:
        for key, value in scalars(row).items():
            tag = key.replace("eval/", "eval_") if key.startswith("eval/") else key
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (mode from WANDB_MODE: `offline` writes under output_dir/wandb, no network)."""

    name = "wandb"

    def __init__(self, output_dir: str, run_name: str | None, config: dict):
        import os

        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "megatune"), name=run_name,
                              config=config, dir=output_dir)

    def log(self, row: dict, step: int) -> None:
        self.run.log(scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


class SwanLabTracker:
    """A SwanLab experiment (project `swanlab_project`, mode `swanlab_mode`, e.g. `offline` or
    `local`; LLaMA-Factory's keys)."""

    name = "swanlab"

    def __init__(self, output_dir: str, run_name: str | None, config: dict):
        import swanlab

        kwargs = {"project": config.get("swanlab_project") or "megatune", "experiment_name": run_name,
                  "config": config, "logdir": str(Path(output_dir) / "swanlog")}
        if config.get("swanlab_mode"):
            kwargs["mode"] = config["swanlab_mode"]
        self.swanlab = swanlab
        self.run = swanlab.init(**kwargs)

    def log(self, row: dict, step: int) -> None:
        self.swanlab.log(scalars(row), step=step)

    def close(self) -> None:
        self.swanlab.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "swanlab": SwanLabTracker}


def open_trackers(report_to: str | None, output_dir: str, run_name: str | None, config: dict) -> list:
    """Start the trackers `report_to` names (rank 0 only); `config` is the run's flat config,
    stored with the run. A tracker whose package went missing since the start-up check is said
    once on stderr and skipped (the jsonl log still has every row)."""
    trackers = []
    names = resolve_all(parse_report_to(report_to))
    if "all" in parse_report_to(report_to):
        print(f"megatune: report_to: all -> {', '.join(names) or 'none installed'}", flush=True)
    for name in names:
        if name not in TRACKERS:
            continue  # refused at start-up (report_problems)
        try:
            trackers.append(TRACKERS[name](output_dir, run_name, config))
        except ImportError as err:
            print(f"megatune: report_to: {name} could not start ({err}); logging to trainer_log.jsonl only",
                  file=sys.stderr)
    return trackers

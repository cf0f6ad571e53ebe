"""Training metrics: model FLOPs, throughput, memory, time left, and where the numbers go
(console, `trainer_log.jsonl`, `running_log.txt`, the trackers of `report_to`, a loss plot, and
at the end the files a Hugging Face Trainer run leaves: `train_results.json`,
`all_results.json`, `trainer_state.json`).

Model FLOPs per step (what "model TFLOP/s" counts, the same convention as DESIGN.md §4) come
from the model family (models/provider.py `step_flops`); for decoders:
  6 x (matmul parameters) x (real tokens)  +  6 x (q heads x head_dim) x sum(doc_len^2) x layers
The first term is forward (2) plus backward (4) for every linear layer including the output
layer (embedding lookups are free; MoE layers count the router and the top-k experts only); the
second is causal attention's two matmuls (QK^T and AV: 2 x 2 x s^2/2 each way forward, x3 for
backward). Padding is not counted.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by torch on this device; on CPU, the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024**2 if sys.platform != "darwin" else rss_kb / 1024**3


class MetricsLog:
    """Rank 0's sink for metric rows and console lines: `trainer_log.jsonl` (appended; resumed
    runs continue it), `running_log.txt` (every line rank 0 printed), the trackers of
    `report_to` (engine/tracking.py), and the loss history for the plot and the summary files.

    With `defer` (a run from step 0 where an earlier run left a log), no file is touched until
    `commit()` (the first checkpoint, or the end of training): rows and lines wait in memory, and
    at the commit they replace the earlier files. A run that fails before then leaves them as
    they were.
    """

    def __init__(self, output_dir: str, report_to: str, resume_step: int, defer: bool = False,
                 run_name: str | None = None, config: dict | None = None, lines: list[str] | None = None):
        from megatune.engine.tracking import open_trackers

        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "trainer_log.jsonl"
        self.running_path = self.output_dir / RUNNING_LOG
        self.pending: list[dict] | None = [] if defer else None
        self.pending_lines: list[str] | None = [] if defer else None
        if not defer:
            self._drop_rows_after(resume_step)
            if resume_step == 0 and self.running_path.is_file():
                self.running_path.unlink()  # a fresh run's text log starts empty, as LLaMA-Factory's
        for line in lines or []:
            self.say(line)
        self.trackers = open_trackers(report_to, output_dir, run_name, config or {})

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run rewrites history from its checkpoint on, so rows are never duplicated."""
        if not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in kept))

    def commit(self) -> None:
        """Replace an earlier run's log with this run's rows so far; later rows are appended."""
        if self.pending is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json_line(r) for r in self.pending))
        self.running_path.write_text("".join(line + "\n" for line in self.pending_lines))
        self.pending = self.pending_lines = None

    def write(self, row: dict) -> None:
        if self.pending is not None:
            self.pending.append(row)
        else:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json_line(row))
        for tracker in self.trackers:
            tracker.log(row, row["step"])

    def say(self, line: str) -> None:
        """Keep one console line in running_log.txt."""
        if self.pending_lines is not None:
            self.pending_lines.append(line)
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.running_path, "a") as f:
            f.write(line + "\n")

    def rows(self) -> list[dict]:
        if self.pending is not None:
            return list(self.pending)
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write_summary(self, train_metrics: dict, state: dict) -> None:
        """The files a transformers Trainer run leaves in output_dir: `train_results.json`
        (`train_metrics`), `eval_results.json` (the last row's eval fields, when the run ended
        with an evaluation), `all_results.json` (both), and `trainer_state.json` (`state`'s
        fields plus `log_history`, the jsonl rows in the Trainer's names). Call after commit."""
        rows = self.rows()
        last = rows[-1] if rows else {}
        evals = {k: v for k, v in last.items() if k.startswith("eval_")}
        results = {"train": train_metrics, **({"eval": {"epoch": last.get("epoch"), **evals}} if evals else {})}
        for split, metrics in results.items():
            _write_json(self.output_dir / f"{split}_results.json", metrics)
        _write_json(self.output_dir / "all_results.json", {k: v for m in results.values() for k, v in m.items()})
        history = trainer_log_history(rows)
        history.append({"epoch": train_metrics.get("epoch"), "step": state.get("global_step"),
                        **{k: v for k, v in train_metrics.items() if k != "epoch"}})
        _write_json(self.output_dir / "trainer_state.json", {**state, "log_history": history})

    def close(self) -> None:
        """Finish the trackers (the files stay usable: `say`, `write_summary`)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


RUNNING_LOG = "running_log.txt"  # LLaMA-Factory's name for the console log kept in output_dir

# trainer_log.jsonl field -> the name in a transformers Trainer's `log_history`
_HF_NAMES = {"lr": "learning_rate"}
_HF_TRAIN_FIELDS = ("loss", "aux_loss", "grad_norm", "lr", "epoch")


def trainer_log_history(rows: list[dict]) -> list[dict]:
    """trainer_log.jsonl rows -> a Trainer's `log_history`: one entry per training row (loss,
    grad_norm, learning_rate, epoch, step) and one per evaluation (eval_*, epoch, step), as
    `Trainer.log` records them (LLaMA-Factory's `plot_loss` reads `step` and `loss` /
    `eval_loss` from it)."""
    history = []
    for row in rows:
        train = {_HF_NAMES.get(k, k): row[k] for k in _HF_TRAIN_FIELDS if row.get(k) is not None}
        if "loss" in row:  # a skipped window's loss is null: the Trainer logs nothing for it either
            history.append({**train, "step": row["step"]})
        evals = {k: v for k, v in row.items() if k.startswith("eval_")}
        if evals:
            history.append({**evals, "epoch": row.get("epoch"), "step": row["step"]})
    return history


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(_finite_or_none(value), indent=2, allow_nan=False, sort_keys=True) + "\n")


def clock(seconds: float) -> str:
    """LLaMA-Factory's time format: whole seconds as H:MM:SS (`str(timedelta)`)."""
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def llamafactory_fields(step: int, total: int, elapsed_s: float, remaining_s: float | None) -> dict:
    """The fields LLaMA-Factory's LogCallback writes into its trainer_log.jsonl rows (beside
    `loss`, `lr`, `epoch`, which megatune's rows carry under the same names): `current_steps`,
    `total_steps`, `percentage` (rounded to 2 decimals), `elapsed_time`, `remaining_time`
    (H:MM:SS). Its loss plot and LlamaBoard read `current_steps` and `loss`."""
    return {
        "current_steps": step,
        "total_steps": total,
        "percentage": round(step / total * 100, 2) if total else 100.0,
        "elapsed_time": clock(elapsed_s),
        "remaining_time": clock(remaining_s or 0.0),
    }


class RecentRate:
    """Time left, from the pace of the last `window` steps (not from start-up: the first steps
    are slow, with compilation, allocator warm-up, data caches; averaging them in made a 74 s run
    predict 679 s at step 5).

    `start(step)` when the loop begins, `tick(step)` after each step. The first step of the run
    is left out of the pace once a second one has finished. `clock` is injectable for tests."""

    def __init__(self, window: int = 20, clock=time.perf_counter):
        self.window, self.clock = window, clock
        self.points: collections.deque = collections.deque(maxlen=window + 1)
        self.started = self.clock()
        self.warm = False

    def start(self, step: int) -> None:
        self.started = self.clock()
        self.points.clear()
        self.points.append((step, self.started))
        self.warm = False

    def tick(self, step: int) -> None:
        self.points.append((step, self.clock()))
        if not self.warm and len(self.points) >= 3:
            self.points.popleft()  # drop the start point: the pace begins after the first step
            self.warm = True

    def elapsed(self) -> float:
        """Seconds since `start`."""
        return self.clock() - self.started

    def seconds_per_step(self) -> float | None:
        if len(self.points) < 2:
            return None
        (s0, t0), (s1, t1) = self.points[0], self.points[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else None

    def remaining(self, step: int, total: int) -> float | None:
        """Seconds left for steps step+1..total at the recent pace; None before any step."""
        pace = self.seconds_per_step()
        return None if pace is None else pace * max(total - step, 0)


def json_line(row: dict) -> str:
    """One strict-JSON line: NaN and infinities (a skipped step's loss) become null, which every
    JSON reader accepts (Python's default writes bare NaN, which strict readers reject)."""
    return json.dumps(_finite_or_none(row), allow_nan=False) + "\n"


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def format_row(row: dict, on_gpu: bool = True, with_time: bool = False) -> str:
    """The console line of a row. Model TFLOP/s is labelled per GPU only on GPUs (the jsonl key
    stays `tflops_per_gpu`); `with_time` (no progress bar, e.g. output to a file) adds elapsed
    and remaining time."""
    parts = [f"step {row['step']}/{row['total_steps']}"]
    flops_label = "tflops_per_gpu" if on_gpu else "TFLOP/s per CPU process"
    for key, fmt in (("loss", ".4f"), ("aux_loss", ".4f"), ("eval_loss", ".4f"), ("lr", ".3e"), ("grad_norm", ".3f"),
                     ("tokens_per_s", ".0f"), ("tflops_per_gpu", ".3g"), ("peak_mem_gb", ".2f")):
        value = row.get(key)
        if value is not None:
            parts.append(f"{flops_label if key == 'tflops_per_gpu' else key} {value:{fmt}}")
    if row.get("skipped_steps"):
        parts.append(f"skipped_steps {row['skipped_steps']}")
    if with_time and "elapsed_time" in row:
        parts.append(f"elapsed {row['elapsed_time']} | remaining {row['remaining_time']}")
    return " | ".join(parts)


def plot_loss(rows: list[dict], out_path: Path) -> str | None:
    """Write a training (and eval) loss curve PNG; returns a message when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot_loss: true needs matplotlib (pip install matplotlib); no plot written"
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return None


class Throughput:
    """Tokens/s and model TFLOP/s per GPU over the steps since the last report."""

    def __init__(self, step_flops, world_size: int):
        """`step_flops(doc_lens) -> FLOPs` is the model's formula (ModelBundle.step_flops)."""
        self.step_flops, self.world = step_flops, world_size
        self.total_flops = 0.0  # since this process started training (train_results' total_flos)
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0
        self.flops = 0.0

    def add(self, doc_lens: list[int], image_grid_thw: list | None = None) -> None:
        self.tokens += sum(doc_lens)
        flops = self.step_flops(doc_lens, image_grid_thw)
        self.flops += flops
        self.total_flops += flops

    def report(self) -> dict:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "tokens_per_s": self.tokens / seconds,
            "tflops_per_gpu": self.flops / seconds / self.world / 1e12,
        }
        self.reset()
        return out


def moe_aux_loss(num_microbatches: int) -> float | None:
    """The step's MoE load-balancing loss (before its coefficient), averaged over MoE layers,
    micro-batches and data-parallel ranks; None for dense models. Collective; clears Megatron's
    tracker for the next step.

    Each rank's tracker holds its own stage's layers; under sequence (or context) parallelism a
    rank's value is its share of the loss, which the tensor/context-parallel ranks add up
    (Megatron's formula splits the mean probability over them). So: sum over every rank, then
    divide by the data-parallel replicas. (Megatron's own reduction averages with
    ReduceOp.AVG, which gloo lacks.)"""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracked = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    if tracked is None:
        return None
    values = tracked["values"].detach().clone().float()
    dist.all_reduce(values)
    layers = int((values != 0).sum())
    clear_aux_losses_tracker()
    return float(values.sum()) / (ps.get_data_parallel_world_size() * max(layers, 1) * num_microbatches)


class ExpertLoad:
    """`moe_log_load`: tokens routed to each expert, per MoE layer, counted from the routers'
    outputs (a forward hook on Megatron's TopKRouter), padding left out, summed over all ranks."""

    def __init__(self, chunks):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts: dict[int, torch.Tensor] = {}
        self.handles = []
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.handles.append(module.register_forward_hook(self._record))

    def _record(self, module, inputs, output) -> None:
        # Under activation recompute the first forward runs without grad and the recomputation
        # with it: count once, as Megatron's expert-bias update does.
        if not module.training or not torch.is_grad_enabled():
            return
        routing_map = output[1].detach()  # [tokens, experts]
        padding = inputs[1] if len(inputs) > 1 else None  # [s, b], True at padding
        if padding is not None:  # masked, not indexed: no device sync
            routing_map = routing_map & ~padding.reshape(-1, 1)
        counts = routing_map.sum(dim=0).to(torch.float64)
        layer = module.layer_number  # global, 1-based
        self.counts[layer] = self.counts.get(layer, 0) + counts

    def report(self, num_layers: int, num_experts: int) -> dict[str, list[float]]:
        """{"layer N": [share of routed tokens per expert]} since the last report. Collective:
        every rank adds its counts (ranks without a layer add zeros)."""
        import torch.distributed as dist

        table = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        for layer, counts in self.counts.items():
            table[layer - 1] += counts.cpu()
        self.counts.clear()
        from megatune.distributed import device

        table = table.to(device())
        dist.all_reduce(table)
        out = {}
        for i, row in enumerate(table.cpu()):
            total = float(row.sum())
            if total > 0:
                out[f"layer {i + 1}"] = [round(float(x) / total, 4) for x in row]
        return out

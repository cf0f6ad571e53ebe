"""Training metrics: model FLOPs, throughput, memory, and where the numbers go (console,
`trainer_log.jsonl`, TensorBoard, a loss plot).

Model FLOPs per step (what "model TFLOP/s" counts, the same convention as DESIGN.md §4) come
from the model family (models/provider.py `step_flops`); for decoders:
  6 x (matmul parameters) x (real tokens)  +  6 x (q heads x head_dim) x sum(doc_len^2) x layers
The first term is forward (2) plus backward (4) for every linear layer including the output
layer (embedding lookups are free; MoE layers count the router and the top-k experts only); the
second is causal attention's two matmuls (QK^T and AV: 2 x 2 x s^2/2 each way forward, x3 for
backward). Padding is not counted.
"""

from __future__ import annotations

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
    """Rank 0's sink for metric rows: jsonl file (appended; resumed runs continue it),
    optional TensorBoard, and the loss history for the plot.

    With `defer` (a run from step 0 where an earlier run left a log), no file is touched until
    `commit()` (the first checkpoint, or the end of training): rows wait in memory, and at the
    commit they replace the earlier log. A run that fails before then leaves it as it was.
    """

    def __init__(self, output_dir: str, report_to: str, resume_step: int, defer: bool = False):
        self.path = Path(output_dir) / "trainer_log.jsonl"
        self.pending: list[dict] | None = [] if defer else None
        if not defer:
            self._drop_rows_after(resume_step)
        self.tensorboard = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("megatune: report_to: tensorboard needs the tensorboard package "
                      "(pip install tensorboard); logging to trainer_log.jsonl only", file=sys.stderr)
            else:
                self.tensorboard = SummaryWriter(str(Path(output_dir) / "runs"))

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json_line(r) for r in self.pending))
        self.pending = None

    def write(self, row: dict) -> None:
        if self.pending is not None:
            self.pending.append(row)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json_line(row))
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.tensorboard.add_scalar(f"train/{key}" if not key.startswith("eval") else key, value, row["step"])
            self.tensorboard.flush()

    def rows(self) -> list[dict]:
        if self.pending is not None:
            return list(self.pending)
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


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


def format_row(row: dict) -> str:
    parts = [f"step {row['step']}/{row['total_steps']}"]
    for key, fmt in (("loss", ".4f"), ("aux_loss", ".4f"), ("eval_loss", ".4f"), ("lr", ".3e"), ("grad_norm", ".3f"),
                     ("tokens_per_s", ".0f"), ("tflops_per_gpu", ".3g"), ("peak_mem_gb", ".2f")):
        value = row.get(key)
        if value is not None:
            parts.append(f"{key} {value:{fmt}}")
    if row.get("skipped_steps"):
        parts.append(f"skipped_steps {row['skipped_steps']}")
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
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0
        self.flops = 0.0

    def add(self, doc_lens: list[int], image_grid_thw: list | None = None) -> None:
        self.tokens += sum(doc_lens)
        self.flops += self.step_flops(doc_lens, image_grid_thw)

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

"""One optimizer step (and one evaluation pass) through Megatron's pipeline schedules.

The training stage supplies the forward step and loss (stages/base.py): each micro-batch returns
(loss sum, unit count, sums to report), Megatron sums them over micro-batches, and gradients
are divided by the step's total unit count over all data-parallel ranks (engine/optim.py). The
loss we report and differentiate is therefore the global mean over the step's units (target
tokens for pt/sft).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megatune.compat.fixes import moe_aux_loss_share
from megatune.data.collator import Batch, pad_to_length
from megatune.distributed import device


@dataclass
class StepResult:
    metrics: dict[str, float]  # the stage's metrics over the global batch ("loss": nan when no units)
    units: float  # the loss's unit count over the global batch (target tokens for pt/sft)
    seq_tokens: int  # all positions fed to the model (incl. padding), this step, all dp ranks
    grad_norm: float | None
    skipped: bool
    nonfinite: str | None = field(default=None)  # what was not finite when skipped

    @property
    def loss(self) -> float:
        return self.metrics["loss"]


def micro_batches(stage, samples: list, micro_batch_size: int, pad_id: int, pad_multiple: int, packed: bool,
                  length: int | None = None) -> list[Batch]:
    """Split this rank's share of a step into micro-batches and collate each with the stage;
    with `length`, every micro-batch is padded to exactly that many positions."""
    batches = [
        stage.collate(samples[i:i + micro_batch_size], pad_id, pad_multiple, packed)
        for i in range(0, len(samples), micro_batch_size)
    ]
    if length is not None:
        batches = [pad_to_length(b, length, pad_id) for b in batches]
    return batches


def uniform_length(stage, global_batch: list, micro_batch_size: int, pad_multiple: int, packed: bool) -> int:
    """The longest collated micro-batch of a whole step, over all data-parallel ranks.

    Pipeline stages exchange fixed-shape activations, and Megatron's allgather MoE dispatcher
    gathers equal token counts across expert-parallel ranks (which span data-parallel replicas),
    so those runs give every micro-batch of a step this one length. Every rank sees the whole
    global batch, so no communication is needed.
    """
    groups = [global_batch[i:i + micro_batch_size] for i in range(0, len(global_batch), micro_batch_size)]
    longest = max(stage.sequence_length(group, packed) for group in groups)
    return -(-longest // pad_multiple) * pad_multiple


def run_schedule(stage, provider, model: list, batches: list[Batch], forward_only: bool) -> dict[str, float]:
    """Forward (and backward) over the micro-batches; returns the stage's `sum_names` totals over
    this step's micro-batches and all data-parallel ranks, known on every rank."""
    stage.prepare(provider, batches)
    seq_len = max(b.tokens.shape[1] for b in batches)
    out = get_forward_backward_func()(
        forward_step_func=stage.forward_step(provider),
        data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iter(batches),
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=seq_len,
        micro_batch_size=batches[0].tokens.shape[0],
        forward_only=forward_only,
    )
    totals = torch.zeros(len(stage.sum_names), dtype=torch.float64, device=device())
    for item in out:  # only the last pipeline stage gets outputs
        totals += item["sums"].to(totals)
    # Sum over data-parallel ranks, then share the last stage's numbers with every rank: one rank
    # keeps them, the others zero theirs, and a sum over all ranks hands them out (sums may be
    # negative, e.g. DPO's rewards, so a max would not do).
    last = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    if last:
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    if not (last and ps.get_data_parallel_rank(with_context_parallel=True) == 0):
        totals.zero_()
    dist.all_reduce(totals)
    return dict(zip(stage.sum_names, totals.tolist()))


def _grads_finite(model: list) -> bool:
    """True when every gradient element on every rank is finite (checked on DDP's buffers).

    One multi-tensor reduction: the largest |g| of each buffer (`torch._foreach_norm` with
    ord=inf, which propagates NaN and cannot overflow as a sum of squares could). It reads each
    gradient once and allocates nothing the size of a buffer (`torch.isfinite` over a whole fp32
    buffer allocates ~7 bytes per element: 20 GB for a 3B-parameter model). The verdict stays on
    the device until the one all-reduce, so the host waits once."""
    grads = [buffer.grad_data for chunk in model for buffer in chunk.buffers + chunk.expert_parallel_buffers]
    bad = torch.zeros(1, dtype=torch.float32, device=device())
    if grads:
        largest = torch.stack(torch._foreach_norm(grads, ord=math.inf))
        bad = (~torch.isfinite(largest)).any().to(torch.float32).reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def _aux_loss_share(stage, model: list, batches: list[Batch]) -> float:
    """Megatron scales each micro-batch's load-balancing loss by its (non-padding) token count
    and then, like every gradient, divides by the step's *loss units*; for SFT, where prompts
    carry no loss, that inflates the balancing pressure by tokens / loss tokens. Returns the
    inverse, which compat/fixes.py folds in so the load-balancing loss is a token mean over the
    step, as Megatron intends (1.0 for dense models).

    Under TP+SP each rank's token count for that scale is the whole tensor-parallel group's:
    with a padding mask, Megatron derives it from per-expert counts that its all-reduce has
    summed in place. Without the mask it would be the rank's slice (1/tp too weak), so MoE
    batches always carry the mask; tests/test_moe.py's tp2_sp cases pin this."""
    if not get_model_config(model[0]).num_moe_experts:
        return 1.0
    counts = torch.tensor(
        [sum(stage.loss_units(b) for b in batches), sum(int(b.lengths.sum()) for b in batches)],
        dtype=torch.float64, device=device(),
    )
    dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(counts[0] / counts[1]) if counts[1] > 0 else 1.0


def _seq_tokens(batches: list[Batch]) -> int:
    """Positions fed to the model this step over all data-parallel ranks (padding included)."""
    seq = torch.tensor([sum(b.tokens.numel() for b in batches)], device=device(), dtype=torch.float64)
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
        dist.all_reduce(seq, group=ps.get_data_parallel_group(with_context_parallel=True))
    else:
        seq.zero_()
    dist.all_reduce(seq, op=dist.ReduceOp.MAX)
    return int(seq.item())


def train_step(stage, provider, model: list, optimizer, batches: list[Batch]) -> StepResult:
    """Zero grads, forward/backward all micro-batches, step unless loss or grads are not finite."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    with moe_aux_loss_share(_aux_loss_share(stage, model, batches)):
        sums = run_schedule(stage, provider, model, batches, forward_only=False)
    metrics, units, seq = stage.metrics(sums), sums[stage.sum_names[1]], _seq_tokens(batches)
    if not math.isfinite(metrics["loss"]):
        return StepResult(metrics, units, seq, None, skipped=True, nonfinite="loss")
    if not _grads_finite(model):
        return StepResult(metrics, units, seq, None, skipped=True, nonfinite="gradients")
    ok, grad_norm, _ = optimizer.step()
    if not ok:  # Megatron's own overflow check (fp16 loss scaling)
        return StepResult(metrics, units, seq, None, skipped=True, nonfinite="gradients (fp16 overflow)")
    return StepResult(metrics, units, seq, grad_norm, skipped=False)


@torch.no_grad()
def evaluate(stage, provider, model: list, batch_groups: list[list[Batch]]) -> dict[str, float]:
    """The stage's metrics over all evaluation batches (every rank gets the same numbers)."""
    for chunk in model:
        chunk.eval()
    totals = dict.fromkeys(stage.sum_names, 0.0)
    try:
        for batches in batch_groups:
            for name, value in run_schedule(stage, provider, model, batches, forward_only=True).items():
                totals[name] += value
    finally:
        for chunk in model:
            chunk.train()
    return stage.metrics(totals)

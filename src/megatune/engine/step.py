"""One optimizer step (and one evaluation pass) through Megatron's pipeline schedules.

The loss we report and differentiate is the token mean over the whole global batch: each
micro-batch returns (summed token loss, token count), Megatron sums both over micro-batches,
and gradients are divided by the step's total token count (see engine/optim.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from megatune.compat.fixes import AuxLossShare
from megatune.data.collator import Batch, collate, collate_packed, pad_to_length
from megatune.data.processors import IGNORE, Sample
from megatune.engine.forward import packed_seq_params


@dataclass
class StepResult:
    loss: float  # global token-mean loss; nan when no tokens or non-finite
    tokens: int  # loss tokens in the global batch
    seq_tokens: int  # all positions fed to the model (incl. padding), this step, all dp ranks
    grad_norm: float | None
    skipped: bool


def micro_batches(samples: list[Sample], micro_batch_size: int, pad_id: int, pad_multiple: int, packed: bool,
                  length: int | None = None) -> list[Batch]:
    """Split this rank's share of a step into micro-batches and collate each; with `length`,
    every micro-batch is padded to exactly that many positions."""
    fn = collate_packed if packed else collate
    batches = [
        fn(samples[i:i + micro_batch_size], pad_id, pad_multiple)
        for i in range(0, len(samples), micro_batch_size)
    ]
    if length is not None:
        batches = [pad_to_length(b, length, pad_id) for b in batches]
    return batches


def uniform_length(global_batch: list[Sample], micro_batch_size: int, pad_multiple: int, packed: bool) -> int:
    """The longest collated micro-batch of a whole step, over all data-parallel ranks.

    Pipeline stages exchange fixed-shape activations, and Megatron's allgather MoE dispatcher
    gathers equal token counts across expert-parallel ranks (which span data-parallel replicas),
    so those runs give every micro-batch of a step this one length. Every rank sees the whole
    global batch, so no communication is needed.
    """
    groups = [global_batch[i:i + micro_batch_size] for i in range(0, len(global_batch), micro_batch_size)]
    if packed:
        longest = max(sum(len(s.input_ids) for s in group) for group in groups)
    else:
        longest = max(len(s.input_ids) for s in global_batch)
    return -(-longest // pad_multiple) * pad_multiple


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _loss_func(labels: torch.Tensor, output: torch.Tensor):
    mask = labels != IGNORE
    loss_sum = (output.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"lm": torch.stack([loss_sum.detach(), count.detach().float()])}


def _moe_padding_mask(batch: Batch, model, device) -> torch.Tensor | None:
    """Padding positions for the MoE routers, which leave them out of the load-balancing loss
    and its token counts (Megatron still dispatches them to experts). Megatron scatters the mask over sequence-parallel ranks only on the
    first pipeline stage; later stages get their slice from us."""
    config = get_model_config(model)
    if not config.num_moe_experts or batch.padding_mask is None:
        return None
    mask = batch.padding_mask
    if config.sequence_parallel and not get_attr_wrapped_model(model, "pre_process"):
        mask = mask.chunk(ps.get_tensor_model_parallel_world_size(), dim=1)[ps.get_tensor_model_parallel_rank()]
    return mask.to(device)


def _forward_step(data_iterator, model):
    batch: Batch = next(data_iterator)
    device = _device()
    labels = batch.labels.to(device)
    output = model(
        batch.tokens.to(device),
        batch.position_ids.to(device),
        None,
        labels=torch.where(labels != IGNORE, labels, torch.zeros_like(labels)),
        packed_seq_params=packed_seq_params(batch, device),
        padding_mask=_moe_padding_mask(batch, model, device),
    )

    def loss_func(out):
        return _loss_func(labels, out)

    return output, loss_func


def run_schedule(model: list, batches: list[Batch], forward_only: bool) -> tuple[float, float]:
    """Forward (and backward) over the micro-batches; returns (loss sum, token count) summed
    over this step's micro-batches and all data-parallel ranks, known on every rank."""
    seq_len = max(b.tokens.shape[1] for b in batches)
    out = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iter(batches),
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=seq_len,
        micro_batch_size=batches[0].tokens.shape[0],
        forward_only=forward_only,
    )
    totals = torch.zeros(2, dtype=torch.float64, device=_device())
    for item in out:  # only the last pipeline stage gets outputs
        totals += item["lm"].to(totals)
    # Sum over data-parallel ranks, then share the last stage's numbers with every stage.
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    else:
        totals.zero_()
    dist.all_reduce(totals, op=dist.ReduceOp.MAX)
    return float(totals[0]), float(totals[1])


def _grads_finite(model: list) -> bool:
    """True when every gradient element on every rank is finite (checked on DDP's buffers)."""
    bad = torch.zeros(1, device=_device())
    for chunk in model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if not torch.isfinite(buffer.grad_data).all():
                bad.fill_(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def _set_aux_loss_share(model: list, batches: list[Batch]) -> None:
    """Megatron scales each micro-batch's load-balancing loss by its (non-padding) token count
    and then, like every gradient, divides by the step's *loss* tokens; for SFT, where prompts
    carry no loss, that inflates the balancing pressure by tokens / loss tokens. Multiply by
    the inverse so the load-balancing loss is a token mean over the step, as Megatron intends.

    Under TP+SP each rank's token count for that scale is the whole tensor-parallel group's:
    with a padding mask, Megatron derives it from per-expert counts that its all-reduce has
    summed in place. Without the mask it would be the rank's slice (1/tp too weak), so MoE
    batches always carry the mask; tests/test_moe.py's tp2_sp cases pin this."""
    if not get_model_config(model[0]).num_moe_experts:
        return
    counts = torch.tensor(
        [sum(b.num_loss_tokens for b in batches), sum(int(b.lengths.sum()) for b in batches)],
        dtype=torch.float64, device=_device(),
    )
    dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
    AuxLossShare.value = float(counts[0] / counts[1]) if counts[1] > 0 else 1.0


def train_step(model: list, optimizer, batches: list[Batch]) -> StepResult:
    """Zero grads, forward/backward all micro-batches, step unless loss or grads are not finite."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    _set_aux_loss_share(model, batches)
    loss_sum, count = run_schedule(model, batches, forward_only=False)
    seq = torch.tensor([sum(b.tokens.numel() for b in batches)], device=_device(), dtype=torch.float64)
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
        dist.all_reduce(seq, group=ps.get_data_parallel_group(with_context_parallel=True))
    else:
        seq.zero_()
    dist.all_reduce(seq, op=dist.ReduceOp.MAX)
    loss = loss_sum / count if count > 0 else math.nan
    if not math.isfinite(loss) or not _grads_finite(model):
        return StepResult(loss, int(count), int(seq.item()), None, skipped=True)
    ok, grad_norm, _ = optimizer.step()
    if not ok:  # Megatron's own overflow check (fp16 loss scaling)
        return StepResult(loss, int(count), int(seq.item()), None, skipped=True)
    return StepResult(loss, int(count), int(seq.item()), grad_norm, skipped=False)


@torch.no_grad()
def evaluate(model: list, batch_groups: list[list[Batch]]) -> float:
    """Token-mean loss over all evaluation batches (every rank gets the same number)."""
    for chunk in model:
        chunk.eval()
    loss_sum = count = 0.0
    try:
        for batches in batch_groups:
            s, c = run_schedule(model, batches, forward_only=True)
            loss_sum, count = loss_sum + s, count + c
    finally:
        for chunk in model:
            chunk.train()
    return loss_sum / count if count else math.nan

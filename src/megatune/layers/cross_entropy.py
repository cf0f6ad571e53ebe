"""Output layer + cross-entropy in token chunks, so the full [tokens, vocab] fp32 logits never exist.

The plain path (GPTModel's output layer, then Megatron's vocab-parallel cross-entropy) writes
the bf16 logits [s, b, V/tp], an fp32 copy, its softmax and the gradient: several GB and
several passes over s*b*V elements per micro-batch (V = 151,936 for Qwen). Here each chunk of
`chunk_tokens` tokens computes its logits with one GEMM, reduces them to (log-sum-exp, target
logit) in one fused kernel and drops them. The backward recomputes each chunk's logits (one
extra GEMM, ~1/3 of the output layer's matmul FLOPs), forms the logits' gradient
`(softmax - onehot) * grad_loss` in one fused kernel and feeds it straight to the two
gradient GEMMs. Peak extra memory is one chunk's logits plus an fp32 weight-gradient
accumulator.

Numerics equal the plain path's: bf16 logits from the GEMM, softmax statistics in fp32,
loss_i = logsumexp(z_i) - z_i[y_i] (Megatron's vocab_parallel_cross_entropy, no label
smoothing). The gradient is correct for any upstream gradient of the per-token losses (masks,
DPO-style per-sequence sums), not only for a token mean.

Under tensor parallelism the weight is this rank's vocab shard [V/tp, h]; the per-chunk
log-sum-exp is combined over the TP group (all-gather of [chunk] fp32) and the target logit
summed (all-reduce of [chunk]), as Megatron's vocab-parallel cross-entropy does.

When the caller declares that the losses' upstream gradient will be `c * token_weights` for
one scalar c (`token_weighted_loss`: pt/sft, whose loss is a masked token sum), and the vocab is
not split over TP, the gradient is formed in the forward instead: each chunk's logits give the
loss and `(softmax - onehot) * weight` in one fused kernel, which feeds the two gradient GEMMs at
once; the backward only scales by c. This saves the recomputed logits GEMM (a third of the output
layer's matmul work: ~8% of a Qwen3-30B-A3B-shaped 4-layer step) at the cost of holding the fp32
weight-gradient accumulator from the forward to the backward. A backward whose upstream gradient
is not c * token_weights fails a device assertion (a RuntimeError at the next sync).

A vocabulary padded for tensor parallelism (layers/vocab_padding.py) passes its real size:
each rank multiplies in only its real rows, so padded columns take no part in the softmax
(the same as -inf logits) and their weight rows get zero gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatune.layers.fused import compiled_for_cuda, accumulate_wgrad
from megatune.layers.vocab_padding import real_rows

DEFAULT_CHUNK_TOKENS = 2048


def _chunk_stats(logits: torch.Tensor, target: torch.Tensor, in_range: torch.Tensor):
    """(logsumexp over the local vocab, logit of the target or 0 when it is on another rank), fp32."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    tgt = torch.gather(z, -1, target.unsqueeze(-1)).squeeze(-1)
    return lse, torch.where(in_range, tgt, torch.zeros_like(tgt))


def _chunk_grad(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, in_range: torch.Tensor,
                grad: torch.Tensor) -> torch.Tensor:
    """d loss / d logits = (softmax(z) - onehot(y)) * grad_loss, in the logits' dtype."""
    p = torch.exp(logits.float() - lse.unsqueeze(-1))
    cols = torch.arange(logits.shape[-1], device=logits.device)
    onehot = (cols.unsqueeze(0) == target.unsqueeze(-1)) & in_range.unsqueeze(-1)
    return ((p - onehot.float()) * grad.float().unsqueeze(-1)).to(logits.dtype)


def _chunk_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, token_weights: torch.Tensor):
    """(per-token loss logsumexp(z) - z[y] fp32, (softmax(z) - onehot(y)) * token_weight in the
    logits' dtype) for one chunk of a vocabulary held whole on this rank: `_chunk_stats` and
    `_chunk_grad` in one compiled kernel, the token weights as the upstream gradient."""
    in_range = torch.ones_like(target, dtype=torch.bool)
    lse, tgt = _chunk_stats(logits, target, in_range)
    return lse - tgt, _chunk_grad(logits, lse, target, in_range, token_weights)


def _fn(fn: Callable, x: torch.Tensor) -> Callable:
    return compiled_for_cuda(fn) if x.is_cuda else fn


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, tp_group, vocab_size):
        tokens, vocab_local = hidden.shape[0], weight.shape[0]
        tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
        first = (dist.get_rank(tp_group) if tp > 1 else 0) * vocab_local
        # Rows past the real vocabulary (padding) are never multiplied in: probability 0.
        real = vocab_local if vocab_size is None else real_rows(vocab_size, vocab_local, first)
        local = target - first
        in_range = (local >= 0) & (local < real)
        local = torch.where(in_range, local, torch.zeros_like(local))
        # A shard of padding only: log-sum-exp over nothing is -inf, which adds 0 to the others'.
        lse = torch.full((tokens,), float("-inf"), dtype=torch.float32, device=hidden.device)
        tgt = torch.zeros_like(lse)
        stats = _fn(_chunk_stats, hidden)
        for i in range(0, tokens if real else 0, chunk):
            j = min(i + chunk, tokens)
            logits = hidden[i:j] @ weight[:real].t()
            lse[i:j], tgt[i:j] = stats(logits, local[i:j], in_range[i:j])
        if tp > 1:
            parts = [torch.empty_like(lse) for _ in range(tp)]
            dist.all_gather(parts, lse, group=tp_group)
            lse = torch.logsumexp(torch.stack(parts), dim=0)
            dist.all_reduce(tgt, group=tp_group)
        ctx.save_for_backward(hidden, weight, local, in_range, lse)
        ctx.chunk, ctx.real = chunk, real
        return lse - tgt

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local, in_range, lse = ctx.saved_tensors
        chunk, real = ctx.chunk, ctx.real
        grad_loss = grad_loss.contiguous()
        grad_hidden = torch.empty_like(hidden) if real else torch.zeros_like(hidden)  # no real rows: no gradient
        # fp32 accumulator: the chunks' weight gradients are summed before one rounding to the
        # weight's dtype, as the plain path's single GEMM does. Padded rows keep zero gradient.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        w, grad_w = weight[:real], grad_weight[:real]
        grad_fn = _fn(_chunk_grad, hidden)
        for i in range(0, hidden.shape[0] if real else 0, chunk):
            j = min(i + chunk, hidden.shape[0])
            logits = hidden[i:j] @ w.t()
            grad_logits = grad_fn(logits, lse[i:j], local[i:j], in_range[i:j], grad_loss[i:j])
            grad_hidden[i:j] = grad_logits @ w
            accumulate_wgrad(grad_w, grad_logits, hidden[i:j])
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


class _LinearCrossEntropyGradInForward(torch.autograd.Function):
    """`_LinearCrossEntropy` for a whole vocabulary (no TP split) whose losses' upstream
    gradient is c * token_weights: the gradients are formed in the forward (see the module
    docstring) and scaled by c in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, token_weights, chunk, vocab_size):
        tokens = hidden.shape[0]
        real = weight.shape[0] if vocab_size is None else real_rows(vocab_size, weight.shape[0], 0)
        w = weight[:real]
        loss = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        # fp32 accumulator, as in _LinearCrossEntropy.backward; padded rows keep zero gradient.
        # A frozen weight (e.g. freeze_language_model) gets none: no GEMM, no buffer held.
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if weight.requires_grad else None)
        step = _fn(_chunk_loss_and_grad, hidden)
        for i in range(0, tokens, chunk):
            j = min(i + chunk, tokens)
            logits = hidden[i:j] @ w.t()
            loss[i:j], grad_logits = step(logits, target[i:j], token_weights[i:j])
            grad_hidden[i:j] = grad_logits @ w
            if grad_weight is not None:
                accumulate_wgrad(grad_weight[:real], grad_logits, hidden[i:j])
        ctx.save_for_backward(grad_hidden, grad_weight, token_weights)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, token_weights = ctx.saved_tensors
        weights = token_weights.to(grad_loss.dtype)
        c = (grad_loss * weights).sum() / weights.sum().clamp_min(1)
        torch._assert_async(
            ((grad_loss - c * weights).abs() <= 1e-6 * c.abs()).all(),
            "fused cross-entropy: the losses' gradient is not c * token_weights (token_weighted_loss misused)",
        )
        # c multiplies in fp32 before the one rounding per element, as in _chunk_grad: a c rounded
        # to bf16 first would bias the whole micro-batch's gradient by up to 2^-9.
        grad_hidden = (grad_hidden.float() * c).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(c).to(ctx.weight_dtype)  # in place: no second fp32 [V, h]
        return grad_hidden, grad_weight, None, None, None, None


_TOKEN_WEIGHTS: contextvars.ContextVar = contextvars.ContextVar("megatune_token_weights", default=None)


@contextlib.contextmanager
def token_weighted_loss(token_weights: torch.Tensor):
    """Declare, for the forward passes run inside, that the per-token losses [b, s] the model
    returns will be reduced as sum(losses * token_weights) * c for one scalar c (pt/sft's
    masked token sum): their upstream gradient is c * token_weights. `output_layer_cross_entropy`
    then forms the gradient in the forward (see the module docstring). token_weights: [b, s]."""
    reset = _TOKEN_WEIGHTS.set(token_weights)
    try:
        yield
    finally:
        _TOKEN_WEIGHTS.reset(reset)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                               tp_group: Optional[dist.ProcessGroup] = None,
                               vocab_size: Optional[int] = None,
                               token_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token cross-entropy of `hidden @ weight.T` against `labels`, without full logits.

    hidden: [s, b, h], the final norm's output, already gathered over sequence-parallel ranks
    (see `output_layer_cross_entropy`); weight: [V/tp, h], this rank's vocab shard (the whole
    vocab when tp_group is None or has one rank) of a vocabulary padded to V rows; labels:
    [b, s] int64 next-token ids in [0, vocab_size). `vocab_size`: the real vocabulary (rows
    from it on are padding, left out of the softmax, zero gradient); None: all V rows are real.
    Returns [b, s] fp32 losses (logsumexp - target logit, natural log); gradients flow to hidden
    and weight. `chunk_tokens` tokens' logits exist at a time. `token_weights` [b, s]: the
    losses' upstream gradient will be c * token_weights (see `token_weighted_loss`); with one
    TP rank and gradients on, the gradient is then formed in the forward.
    Raises ValueError on mismatched shapes."""
    if hidden.dim() != 3 or labels.dim() != 2 or labels.shape != (hidden.shape[1], hidden.shape[0]):
        raise ValueError(f"fused_linear_cross_entropy wants hidden [s, b, h] and labels [b, s]; "
                         f"got hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[2]}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    s, b, h = hidden.shape
    flat = hidden.reshape(s * b, h)  # token order s-major, so labels go [b, s] -> [s, b]
    target = labels.t().reshape(-1)
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    grad_in_forward = token_weights is not None and tp == 1 and torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad)
    if grad_in_forward:
        if token_weights.shape != labels.shape:
            raise ValueError(f"token_weights {tuple(token_weights.shape)} do not match labels {tuple(labels.shape)}")
        weights = token_weights.t().reshape(-1)
        loss = _LinearCrossEntropyGradInForward.apply(flat, weight, target, weights, chunk_tokens, vocab_size)
    else:
        loss = _LinearCrossEntropy.apply(flat, weight, target, chunk_tokens, tp_group, vocab_size)
    return loss.view(s, b).t().contiguous()


def output_layer_cross_entropy(output_layer, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, vocab_size: Optional[int] = None) -> torch.Tensor:
    """What GPTModel's `output_layer(hidden)` + `compute_language_model_loss(labels, logits)`
    compute, through `fused_linear_cross_entropy`: the same tensor-parallel input handling as
    Megatron's ColumnParallelLinear (all-gather over sequence-parallel ranks, whose backward
    reduce-scatters; otherwise an identity whose backward all-reduces over TP).

    output_layer: the model's ColumnParallelLinear; hidden: [s/tp (SP) or s, b, h]; weight: its
    weight or the shared embedding weight [V/tp, h]; labels [b, s]; vocab_size: the real
    vocabulary when V is padded (None: not padded). Returns [b, s] fp32."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    group = getattr(output_layer, "tp_group", None)
    tp = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    if tp > 1:
        if output_layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    return fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens, group if tp > 1 else None, vocab_size,
                                      token_weights=_TOKEN_WEIGHTS.get())


def run_forward_pre_hooks(module: torch.nn.Module, args: tuple) -> None:
    """Run `module`'s forward pre-hooks as calling it would, for code that reads its weight
    without calling it. Megatron's DDP waits there for the overlapped all-gather of the
    module's parameters (`overlap_param_gather`) and starts the next bucket's. Skipping the wait
    would read a weight that is still being gathered. It would also leave the gather
    outstanding, and the next step fails with `assert self.param_gather_handle is None`."""
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            hook(module, args, {})
        else:
            hook(module, args)


def use_fused_linear_cross_entropy(model, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                   vocab_size: Optional[int] = None) -> None:
    """Make a Megatron GPTModel compute its training loss with `output_layer_cross_entropy`.

    Replaces the instance's `_postprocess` (GPTModel's last step: output layer, then the loss
    when labels are given) with one that, when labels are given on the last stage and neither
    multi-token prediction nor inference is in play, returns the same [b, s] fp32 per-token loss
    without materialising logits; every other call goes to Megatron's own method. Idempotent.
    `vocab_size`: the real vocabulary when the model's is padded (layers/vocab_padding.py).
    """
    if getattr(model, "_megatune_fused_ce", False):
        return
    original = model._postprocess

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        plain = (
            labels is None
            or not self.post_process
            or kwargs.get("mtp_in_postprocess")
            or self.config.mtp_num_layers is not None
            or kwargs.get("inference_context") is not None
            or kwargs.get("inference_params") is not None
        )
        if plain:
            return original(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        run_forward_pre_hooks(self.output_layer, (hidden_states,))
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        return output_layer_cross_entropy(self.output_layer, hidden_states, weight, labels, chunk_tokens, vocab_size)

    model._postprocess = types.MethodType(_postprocess, model)
    model._megatune_fused_ce = True

"""Torch-native fused kernels for the hot elementwise pieces of a training step (no Transformer
Engine, no Apex), and the patches that let Megatron-core 0.16 use them.

Each piece computes exactly the formula of the plain path it replaces; on CUDA it runs through
`torch.compile` (Inductor writes one Triton kernel per forward and per backward instead of the
5-15 separate eager kernels of the formula), on CPU it runs the same formula eagerly. Speed-ups
measured on one H200 are in DESIGN.md §7 and docs/train.md ("Speed (issue 13)").

| piece | plain path | switched by (TransformerConfig field) |
|---|---|---|
| RMSNorm, incl. q/k norm | layers/norm.py's eager fp32 formula | `persist_layer_norm` (read by layers/norm.py) |
| RoPE | Megatron's `_apply_rotary_pos_emb_bshd` | `apply_rope_fusion`, after `enable_fast_path()` |
| SwiGLU | unfused `silu(a) * b` | `bias_activation_fusion` (Megatron's own compiled kernel) |
| weight-grad accumulation | bf16 wgrad + a hook adding it to the fp32 `main_grad` | `gradient_accumulation_fusion`, after `enable_fast_path()` |
| expert weight-grad accumulation | the same hook (an unvectorised mixed-dtype add) | `gradient_accumulation_fusion` (layers/experts.py) |
| grad-norm / scale in the optimizer | a host sync per tensor (`torch.tensor(list of norms)`) | always, after `enable_fast_path()` |
| linear + cross-entropy | full logits | see layers/cross_entropy.py |
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------------
# The formulas (eager; compiled on CUDA)


def _rms_norm_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order as transformers' Llama/Qwen RMSNorm and layers/norm.py: normalise in fp32,
    # cast back to the input dtype, then scale by the weight.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope_formula(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # Megatron's _apply_rotary_pos_emb_bshd (non-interleaved, mscale 1): cos/sin of the angle
    # rounded to t's dtype, t*cos + rotate_half(t)*sin on the first rot_dim channels.
    rot = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    cos = torch.cos(freqs).to(t.dtype)
    sin = torch.sin(freqs).to(t.dtype)
    x1, x2 = torch.chunk(t_rot, 2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((t_rot * cos + rotated * sin, t_pass), dim=-1)


@functools.lru_cache(maxsize=None)
def compiled_for_cuda(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True, dynamic=None)


def _pick(fn: Callable, x: torch.Tensor, compiled: bool | None) -> Callable:
    """The compiled formula on CUDA (or when asked), the eager one otherwise."""
    use = x.is_cuda if compiled is None else compiled
    return compiled_for_cuda(fn) if use else fn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, compiled: bool | None = None) -> torch.Tensor:
    """RMSNorm over the last dim: `weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`.

    x: [..., h] (any float dtype; statistics in fp32), weight: [h]. Returns x's shape in
    torch's promotion of (weight, x) dtypes, as the plain module does. `compiled`: None picks
    torch.compile on CUDA and eager otherwise. Gradients flow to x and weight; the weight's
    gradient is this rank's local sum over tokens, so under sequence parallelism Megatron's
    all-reduce of `sequence_parallel` params (finalize_model_grads) completes it, as for the plain
    module."""
    return _pick(_rms_norm_formula, x, compiled)(x, weight, eps)


def rotary(t: torch.Tensor, freqs: torch.Tensor, compiled: bool | None = None) -> torch.Tensor:
    """Rotary position embedding in Megatron's "bshd" layout (non-interleaved halves).

    t: [s, b, heads, d]; freqs: [s, 1, 1, rot_dim] angles in fp32 (rot_dim <= d, even).
    Returns t's shape and dtype; channels past rot_dim pass through unchanged."""
    return _pick(_rope_formula, t, compiled)(t, freqs)


# ---------------------------------------------------------------------------------------------
# Megatron's hooks for "fused" RoPE (normally Transformer Engine's kernels)


def fused_apply_rotary_pos_emb(t, freqs, transpose_output_memory=False, interleaved=False):
    """Stand-in for TE's `fused_apply_rotary_pos_emb` that Megatron calls when
    `apply_rope_fusion` is on (rope_utils.apply_rotary_pos_emb, bshd input)."""
    if interleaved:
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=True)
    return rotary(t, freqs)


def fused_apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_size=1, cp_rank=0):
    """Stand-in for TE's packed ("thd") fused RoPE: Megatron's own unfused per-document path
    (correct, not faster), so that `apply_rope_fusion` also works on packed batches."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings import rope_utils

    if cp_size != 1:
        raise NotImplementedError("packed sequences with context parallelism need Transformer Engine")
    return rope_utils._apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_group=ps.get_context_parallel_group())


# ---------------------------------------------------------------------------------------------
# Weight-gradient accumulation straight into the fp32 main_grad buffer


@functools.lru_cache(maxsize=None)
def _addmm_out_dtype_works(device: torch.device) -> bool:
    """Whether `torch.addmm(c32, a16, b16, out_dtype=float32, out=c32)` (one cuBLAS GEMM with
    beta=1 and an fp32 C, what Apex's `wgrad_gemm_accum_fp32` does) runs and is right here."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(64, 32, device=device, generator=gen).to(torch.bfloat16)
        b = torch.randn(32, 48, device=device, generator=gen).to(torch.bfloat16)
        c = torch.randn(64, 48, device=device, generator=gen)
        want = c + a.float() @ b.float()
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return bool(torch.allclose(c, want, atol=1e-3, rtol=1e-3))
    except (RuntimeError, TypeError):
        return False


def accumulate_wgrad(main_grad: torch.Tensor, grad_output: torch.Tensor, total_input: torch.Tensor) -> None:
    """main_grad[out, in] += grad_output[t, out]^T @ total_input[t, in], in place.

    With an fp32 main_grad and bf16/fp16 operands this is one GEMM with fp32 accumulation and
    fp32 output where torch supports `addmm(..., out_dtype=)` (CUDA); otherwise the product is
    formed in the operands' dtype and added (what the unfused path does, minus the hook)."""
    a, b = grad_output.t(), total_input
    if main_grad.dtype == a.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.dtype == torch.float32 and main_grad.is_cuda and _addmm_out_dtype_works(main_grad.device):
        torch.addmm(main_grad, a, b, out_dtype=torch.float32, out=main_grad)
    else:
        main_grad.add_(a @ b)


def _add_formula(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    main_grad.add_(grad)


def add_into_main_grad(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    """main_grad += grad in place (e.g. an fp32 buffer += a bf16 weight gradient of the same shape).

    On CUDA with mixed dtypes this is one compiled (vectorised) kernel: torch's eager add of a
    bf16 into an fp32 tensor runs its unvectorised casting kernel, measured at about half of the
    H200's memory bandwidth on the MoE experts' gradients (docs/train.md). Same values: the
    bf16 operand is widened exactly and added in fp32 either way."""
    if main_grad.is_cuda and main_grad.dtype != grad.dtype:
        compiled_for_cuda(_add_formula)(main_grad, grad)
    else:
        main_grad.add_(grad)


class TorchWgradAccumulation:
    """Module-like stand-in for Apex's `fused_weight_gradient_mlp_cuda`, which Megatron's
    LinearWithGradAccumulationAndAsyncCommunication calls when `gradient_accumulation_fusion`
    is on: the weight gradient goes straight into `weight.main_grad` (DDP's fp32 buffer), so no
    bf16 wgrad tensor is written and DDP's hook adds nothing afterwards."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        accumulate_wgrad(main_grad, grad_output, total_input)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        accumulate_wgrad(main_grad, grad_output, total_input)


# ---------------------------------------------------------------------------------------------
# Optimizer helpers without per-tensor host syncs


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for `amp_C.multi_tensor_l2norm` (and Megatron's local fallback, which builds a
    host tensor from a list of device norms: one device->host copy per parameter). Returns
    (norm [1] fp32 on the tensors' device, None), with no host sync."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for `amp_C.multi_tensor_scale`: dst = src * scale for each pair (dst may be src
    and may have another dtype), in a few foreach kernels instead of one launch per tensor."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if src is dst or all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
        return
    torch._foreach_copy_(dst, src if scale == 1.0 else torch._foreach_mul(src, scale))


# ---------------------------------------------------------------------------------------------
# Installation


_INSTALLED: list[str] = []


def enable_fast_path() -> list[str]:
    """Point Megatron-core's optional-kernel hooks at the torch-native pieces above; returns
    the names installed. Idempotent. Must run before any TransformerConfig with
    `apply_rope_fusion` or `gradient_accumulation_fusion` is built (its __post_init__ /
    the linear layers' __init__ check that a kernel exists). Each target is an attribute
    Megatron sets to None (or leaves undefined) when TE/Apex is missing; where TE or Apex is
    present their kernels are kept."""
    from megatron.core import utils as mutils
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.tensor_parallel import layers as tp_layers

    def install(name: str, target, attr: str, value, only_if: Callable[[object], bool]) -> None:
        if name in _INSTALLED:
            return
        if only_if(getattr(target, attr, None)):
            setattr(target, attr, value)
            _INSTALLED.append(name)

    # apply_rope_fusion: rope_utils.apply_rotary_pos_emb calls these module globals.
    install("rope", rope_utils, "fused_apply_rotary_pos_emb", fused_apply_rotary_pos_emb, lambda v: v is None)
    install("rope_thd", rope_utils, "fused_apply_rotary_pos_emb_thd", fused_apply_rotary_pos_emb_thd,
            lambda v: v is None)
    # gradient_accumulation_fusion: layers.py imports Apex's extension at import time.
    if not tp_layers._grad_accum_fusion_available and "wgrad" not in _INSTALLED:
        tp_layers.fused_weight_gradient_mlp_cuda = TorchWgradAccumulation
        tp_layers._grad_accum_fusion_available = True
        _INSTALLED.append("wgrad")
    # Grad-norm and grad/param copies: replace Megatron's per-tensor Python fallbacks.
    install("l2norm", clip_grads, "l2_norm_impl", foreach_l2_norm,
            lambda v: v is mutils.local_multi_tensor_l2_norm)
    install("clip_scale", clip_grads, "multi_tensor_scale_impl", foreach_scale,
            lambda v: v is mutils.local_multi_tensor_scale)
    install("copy_scale", moptimizer, "multi_tensor_scale_impl", foreach_scale,
            lambda v: v is mutils.local_multi_tensor_scale)
    return list(_INSTALLED)

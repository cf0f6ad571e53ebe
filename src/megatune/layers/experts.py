"""Grouped-GEMM experts without Transformer Engine: a drop-in for Megatron's experts module.

`GroupedExperts` has SequentialMLP's contract in Megatron-core 0.16.1 (constructor
`(num_local_experts, config, submodules, pg_collection)`, `forward(permuted_local_hidden_states,
tokens_per_expert, permuted_probs) -> (output, None)`), but keeps every local expert's weights in
two stacked parameters and runs them with two grouped GEMMs instead of a Python loop:

    weight1  [num_local_experts, 2 * ffn / etp, hidden]   # per expert: [gate_r; up_r], like fc1
    weight2  [num_local_experts, hidden, ffn / etp]       # per expert: like fc2

Layout: each expert's slice is exactly the [out, in] weight of SequentialMLP's per-expert
ColumnParallelLinear/RowParallelLinear (and of HF's per-expert nn.Linear), so loading, export
and dist checkpoints map expert by expert with no transpose, and a checkpoint is interchangeable
with SequentialMLP's. For the GEMM this is the "TN" (K-major on both operands) layout that
`nn.Linear`, cuBLAS and the CUTLASS kernels behind `torch.nn.functional.grouped_mm` are built for:
the forward passes `weight.transpose(1, 2)` (a column-major view, no copy), the input gradient
reads the weight row-major, and the weight gradient is the 2D x 2D grouped GEMM
`grad_out^T @ x` per expert, which writes [out, in] directly.

Compute: on CUDA with bf16 and 16-aligned dims, `torch.nn.functional.grouped_mm` (torch >= 2.10;
`torch._grouped_mm` on older torch) over the tokens grouped by expert (int32 end offsets from
`tokens_per_expert`). With `gradient_accumulation_fusion` and DDP's fp32 `main_grad` present,
the weight gradient is added into `main_grad` in the backward itself by one vectorised kernel
(`_GroupedLinear`), as Megatron's linear layers do with that flag, instead of by DDP's hook.
Otherwise (CPU, fp32/fp16, unaligned dims, no grouped_mm) a per-expert matmul
loop that is numerically the same as SequentialMLP's. The router probabilities are applied as
SequentialMLP's MLP applies `per_token_scale`: after the activation, before fc2, in the probs'
dtype (fp32) and cast back.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

from megatune.layers.fused import add_into_main_grad

logger = logging.getLogger(__name__)

ALIGN = 16  # grouped_mm (CUTLASS) wants K and N in multiples of 16 bytes; we ask 16 elements


def grouped_mm_fn():
    """torch's grouped GEMM: the public API (torch >= 2.10) or the private one before; None if absent."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[tokens, in] grouped by expert -> [tokens, out] through `weight` [experts, out, in]."""
    return grouped_mm_fn()(x, weight.transpose(1, 2), offs=offs)


class _GroupedLinear(torch.autograd.Function):
    """out[rows of expert e] = x[rows of expert e] @ weight[e]^T via grouped_mm, with the weight
    gradient added straight into `weight.main_grad` (DDP's fp32 buffer).

    x: [tokens, in] grouped by expert; weight: [experts, out, in]; offs: [experts] int32 end
    offsets -> [tokens, out]. Backward: grad_x = grad_out @ weight[e] (grouped_mm),
    grad_weight[e] = grad_out_e^T @ x_e (the 2D x 2D grouped_mm, [experts, out, in]) added into
    main_grad by `add_into_main_grad`. Like Megatron's LinearWithGradAccumulation... with
    `gradient_accumulation_fusion`, it sets `weight.grad_added_to_main_grad` (so DDP's hook adds
    nothing) and returns an unwritten weight-sized gradient, so that the hook still runs, on the
    backward's own thread, and marks the bucket ready for `overlap_grad_reduce`; a weight without
    that attribute (no Megatron DDP) gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, offs):
        ctx.save_for_backward(x, weight, offs)
        return _grouped_linear(x, weight, offs)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offs = ctx.saved_tensors
        gmm = grouped_mm_fn()
        grad_out = grad_out.contiguous()
        grad_x = gmm(grad_out, weight, offs=offs)
        add_into_main_grad(weight.main_grad, gmm(grad_out.t(), x, offs=offs))
        if not hasattr(weight, "grad_added_to_main_grad"):  # no DDP hook to trigger (Megatron: None)
            return grad_x, None, None
        weight.grad_added_to_main_grad = True
        return grad_x, torch.empty_like(weight), None


def _ignore_extra_state(module, incompatible_keys):
    """Loaded checkpoints carry SequentialMLP-compatible `_extra_state` objects we do not keep."""
    for key in [k for k in incompatible_keys.unexpected_keys if k.endswith("_extra_state")]:
        incompatible_keys.unexpected_keys.remove(key)


class GroupedExperts(MegatronModule):
    """All local experts of one MoE layer as two stacked weights and two grouped GEMMs."""

    def __init__(self, num_local_experts, config, submodules=None, pg_collection=None):
        super().__init__(config=config)
        if config.add_bias_linear:
            raise ValueError("GroupedExperts: expert biases are not supported (add_bias_linear must be False)")
        if getattr(config, "moe_latent_size", None) is not None:
            raise ValueError("GroupedExperts: moe_latent_size (latent MoE projection) is not supported")
        if config.fp8 or getattr(config, "fp4", None):
            raise ValueError("GroupedExperts: fp8/fp4 need Transformer Engine's grouped experts")
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp  # expert-tensor-parallel group: shards the FFN dim
        self.dp_group = pg_collection.expt_dp
        tp_size = self.tp_group.size()
        ffn = config.moe_ffn_hidden_size
        if ffn % tp_size:
            raise ValueError(f"moe_ffn_hidden_size={ffn} is not divisible by expert_tensor_parallel_size={tp_size}")
        self.hidden = config.hidden_size
        self.ffn_local = ffn // tp_size
        fc1_out = self.ffn_local * (2 if config.gated_linear_unit else 1)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = torch.nn.Parameter(
            torch.empty(num_local_experts, fc1_out, self.hidden, device=device, dtype=config.params_dtype)
        )
        self.weight2 = torch.nn.Parameter(
            torch.empty(num_local_experts, self.hidden, self.ffn_local, device=device, dtype=config.params_dtype)
        )
        # Sharded over ETP along the FFN dim (grad-norm counts each shard once per TP group);
        # with EP each rank holds different experts, so DDP must not all-reduce them over the full
        # DP group (Megatron reduces `allreduce=False` params over the expert-data-parallel group).
        set_tensor_model_parallel_attributes(self.weight1, is_parallel=True, dim=1, stride=1)
        set_tensor_model_parallel_attributes(self.weight2, is_parallel=True, dim=2, stride=1)
        expert_parallel = config.expert_model_parallel_size > 1
        for w in (self.weight1, self.weight2):
            setattr(w, "allreduce", not expert_parallel)
        if config.perform_initialization:
            self._initialize()
        self.aligned = self.hidden % ALIGN == 0 and self.ffn_local % ALIGN == 0
        if torch.cuda.is_available() and not self.aligned:
            logger.warning(
                "GroupedExperts: hidden_size=%d or moe_ffn_hidden_size/etp=%d is not a multiple of %d; "
                "torch grouped_mm cannot run it, so experts use the per-expert matmul loop (slow)",
                self.hidden, self.ffn_local, ALIGN,
            )
        # None: decide per call (CUDA + bf16 + aligned + grouped_mm present); True/False: force
        # (tests use True to run the grouped path on CPU, where torch >= 2.13 implements it).
        self.force_grouped_mm: bool | None = None
        self.register_load_state_dict_post_hook(_ignore_extra_state)

    @torch.no_grad()
    def _initialize(self):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

        def init():
            for e in range(self.num_local_experts):
                self.config.init_method(self.weight1[e])
                self.config.output_layer_init_method(self.weight2[e])

        if torch.cuda.is_available() and self.weight1.is_cuda:
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                init()
        else:
            init()

    # ---- compute -------------------------------------------------------------------------

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        if grouped_mm_fn() is None:
            return False
        if self.force_grouped_mm is not None:
            return self.force_grouped_mm
        return x.is_cuda and x.dtype == torch.bfloat16 and self.weight1.dtype == torch.bfloat16 and self.aligned

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """`_grouped_linear`, with the weight gradient fused into main_grad where it can be."""
        if self.config.gradient_accumulation_fusion and hasattr(weight, "main_grad") and torch.is_grad_enabled():
            return _GroupedLinear.apply(x, weight, offs)
        return _grouped_linear(x, weight, offs)

    def _activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Activation then the per-token router weight, exactly as Megatron's MLP does with
        `per_token_scale` (fused weighted SwiGLU when bias_activation_fusion, else unfused)."""
        config = self.config
        if config.bias_activation_fusion and config.gated_linear_unit and config.activation_func == F.silu:
            return weighted_bias_swiglu_impl(h, None, probs.unsqueeze(-1), config.activation_func_fp8_input_store)
        if config.gated_linear_unit:
            x_glu, x_linear = torch.chunk(h, 2, dim=-1)
            if (val := config.activation_func_clamp_value) is not None:
                x_glu = x_glu.clamp(min=None, max=val)
                x_linear = x_linear.clamp(min=-val, max=val)
            h = config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
        else:
            h = config.activation_func(h)
        dtype = h.dtype
        return (h * probs.unsqueeze(-1)).to(dtype)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        if x.shape[0] > 0 and self.uses_grouped_mm(x):
            # grouped_mm wants int32 end offsets on the input's device.
            offs = torch.cumsum(tokens_per_expert.to(device=x.device, dtype=torch.int32), 0, dtype=torch.int32)
            h = self._linear(x, self.weight1, offs)
            h = self._activation(h, probs)
            out = self._linear(h, self.weight2, offs)
        else:
            # Per-expert loop; every expert's weights take part even with no tokens, so each has
            # a (zero) gradient, as in SequentialMLP.
            counts = tokens_per_expert.tolist()
            outs = []
            for e, (xe, pe) in enumerate(zip(torch.split(x, counts), torch.split(probs, counts))):
                h = torch.matmul(xe, self.weight1[e].t())
                h = self._activation(h, pe)
                outs.append(torch.matmul(h, self.weight2[e].t()))
            out = torch.cat(outs, dim=0)
        return out, None

    def backward_dw(self):
        """Weight gradients are computed in the normal backward (no delayed wgrad)."""

    # ---- distributed checkpoint ----------------------------------------------------------

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The same global tensors as SequentialMLP writes (non-singleton format):
        `{prefix}experts.linear_fc1.weight` [experts, 2*ffn, hidden] with the gate half and the up
        half sharded separately over ETP (Megatron's swiglu factory), and
        `{prefix}experts.linear_fc2.weight` [experts, hidden, ffn]; the expert axis is sharded over
        EP ranks at this rank's global expert offset. Checkpoints are interchangeable with
        SequentialMLP's, and reshard across EP/ETP."""
        if (metadata or {}).get("singleton_local_shards", False):
            raise NotImplementedError("GroupedExperts: singleton_local_shards checkpoints are not supported")
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        axis = len(sharded_offsets)  # global index of the expert axis (the local tensor's dim 0)
        replica_id = (0, 0, self.dp_group.rank())
        glu = self.config.gated_linear_unit

        def build(key, t, replica_id, flattened_range, ffn_axis, halves):
            if flattened_range is not None:
                raise NotImplementedError("GroupedExperts: flattened (legacy distributed-optimizer) checkpoints")
            parts = torch.chunk(t, halves, dim=ffn_axis) if halves > 1 else (t,)
            return [
                ShardedTensor.from_rank_offsets(
                    key,
                    part.contiguous(),
                    *sharded_offsets,
                    (axis, ep_rank, ep_size),
                    (axis + ffn_axis, i * tp_size + tp_rank, tp_size * halves),
                    replica_id=replica_id,
                    prepend_axis_num=axis,
                )
                for i, part in enumerate(parts)
            ]

        def merge(sub_state, ffn_axis):
            with torch.no_grad():
                return torch.cat(sub_state, dim=ffn_axis)

        state = {}
        for name, key, ffn_axis, halves in (
            ("weight1", "linear_fc1.weight", 1, 2 if glu else 1),
            ("weight2", "linear_fc2.weight", 2, 1),
        ):
            state[f"{prefix}{name}"] = ShardedTensorFactory(
                f"{prefix}experts.{key}",
                getattr(self, name),
                partial(build, ffn_axis=ffn_axis, halves=halves),
                partial(merge, ffn_axis=ffn_axis),
                replica_id,
            )
        # SequentialMLP's linears also save an (empty) `_extra_state` object per expert; write the
        # same so that SequentialMLP can load a GroupedExperts checkpoint (as GroupedMLP does).
        num_global = ep_size * self.num_local_experts
        for i in range(self.num_local_experts):
            e = ep_rank * self.num_local_experts + i
            for mod in ("linear_fc1", "linear_fc2"):
                state[f"{prefix}expert{e}.{mod}._extra_state"] = make_sharded_object_for_checkpoint(
                    None,
                    f"{prefix}experts.{mod}._extra_state",
                    (*sharded_offsets, (axis, e, num_global)),
                    (0, tp_rank, self.dp_group.rank()),
                )
        return state

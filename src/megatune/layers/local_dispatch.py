"""Sync-free token permutation for Megatron's MoE layers (drop-less routing).

Megatron-core 0.16.1's all-to-all dispatcher groups tokens by expert with `moe_utils.permute`
and scatters the expert outputs back with `unpermute`. Without Transformer Engine both cost
more than they need to:

- `permute` finds each expert's tokens with `masked_select`, whose output length is
  data-dependent, so every call blocks the host until the GPU has caught up (twice: token
  indices and router probabilities). Each blocking copy drains the GPU queue.
- The backward of its row gather and the forward of `unpermute` add rows with atomics
  (`index_add_` / `scatter_add_`): slow, and in bf16 every one of the top-k additions rounds.

`permute_dropless` finds the same rows with `torch.nonzero_static` (its output size is the
static drop-less count tokens x top-k) in the same order (expert-major, ascending token index
within an expert), and also returns the inverse map: for each token, the rows that hold its
top-k copies. With both maps every direction is a plain row gather: `_GatherSum` gathers rows
and sums each token's top-k copies (fp32 accumulation, one rounding; one Triton kernel on CUDA,
layers/gather_sum.py), and its backward is the same gather through the other map. No atomics,
deterministic, no host sync.

Three dispatchers use it:
- `SyncFreeAlltoAllDispatcher`: Megatron's all-to-all dispatcher with only the permute and the
  un-permute replaced; with expert parallelism it keeps the one host sync the all-to-all needs
  (its split sizes).
- `SyncFreeAllGatherDispatcher`: Megatron's all-gather dispatcher with the same replacement; one
  host copy per layer (where this rank's experts' rows start and how many there are), queued so
  that the GPU keeps working while the host waits for it.
- `LocalTokenDispatcher`: when one rank holds every expert (EP = expert TP = 1: one GPU, or
  pure data parallelism) it also drops the all-to-all's bookkeeping: the host copy of the
  per-expert counts (the `before_permutation_2` sync) and the chunk re-sort, which is the
  identity with one source rank but costs a full copy of the permuted activations. The
  experts get the counts as a GPU tensor (megatune's GroupedExperts builds its grouped-GEMM
  offsets from them on the GPU; Megatron's SequentialMLP reads them with `.tolist()`).

On the Qwen3-30B-A3B shape (128 experts, top-8) the syncs left a third of the step idle.
`MoELayerWithSyncFreeDispatch` is Megatron's MoELayer that installs the one
`sync_free_dispatcher_for` picks.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

from megatune.layers.gather_sum import gather_sum


class _GatherSum(torch.autograd.Function):
    """`gather_sum(x, index)` whose backward is `gather_sum(grad, inverse)`.

    Valid when `index` [N, k] and `inverse` [M, k'] are inverse maps between x's M rows and the
    N x k output slots, each row used once: row r = index[i, j] exactly when inverse[r] names
    slot (i, j) and k' = 1, or the roles swapped. Then the gradient of a sum of copies is a gather,
    and the gradient of a gather is a sum of copies. The k > 1 side may hold empty slots (an index
    equal to the row count of the tensor it reads; see layers/gather_sum.py)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return gather_sum(x, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return gather_sum(grad.contiguous(), inverse), None, None


def permute_dropless(tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor, topk: int):
    """Group tokens by expert without a host sync (drop-less routing: exactly `topk` experts per token).

    tokens: [T, h]; routing_map: [T, E] bool with `topk` True per row; probs: [T, E].
    Returns (permuted tokens [T*topk, h], their router probs [T*topk], source token of each
    permuted row [T*topk] int64, rows [T, topk] int64: the permuted rows holding each token's
    copies in ascending expert order, tokens per expert [E] int64), all on tokens' device. The
    order equals Megatron's `moe_utils.permute` (expert-major, ascending token within an expert).

    Precondition: exactly `topk` routes for every token. Megatron-core 0.16.1's top-k router
    gives every token (padding included: the padding mask only shapes the load-balancing loss)
    exactly `topk` experts when no capacity is set; `sync_free_dispatcher_for` keeps these dispatchers
    off otherwise. A routing map that broke it would fail an asynchronous device assertion (a
    RuntimeError at the next sync), never pass silently.
    """
    flat, source, rows, counts = _dropless_routes(routing_map, topk)
    permuted_probs = probs.t().reshape(-1).index_select(0, flat)
    permuted = _GatherSum.apply(tokens, source.unsqueeze(1), rows)
    return permuted, permuted_probs, source, rows, counts


def _dropless_routes(routing_map: torch.Tensor, topk: int):
    """The index maps of `permute_dropless` for a [T, E] routing map with `topk` routes per token:
    (flat [T*topk]: expert * T + token of each permuted row, source [T*topk]: its token,
    rows [T, topk]: each token's permuted rows in ascending expert order, counts [E] int64)."""
    num_tokens = routing_map.shape[0]
    counts = routing_map.sum(dim=0)
    # Every token needs exactly top-k routes (not only the total): `rows` is [T, topk].
    torch._assert_async((routing_map.sum(dim=1) == topk).all(), "permute_dropless: a token's routes != top-k")
    expert_major = routing_map.t().reshape(-1)  # [E*T], index = expert * T + token
    flat = torch.nonzero_static(expert_major, size=num_tokens * topk).squeeze(1)
    source = flat % num_tokens
    # Permuted row p holds route (t, e) = (source[p], flat[p] // T); that route's place in the
    # token-major order (t, then e) is its rank in the row-major routing map: a 1-D prefix sum
    # (one scan over T*E; a scan along dim 0 of the [T, E] map is a slow kernel).
    token_major_rank = routing_map.reshape(-1).cumsum(0)  # [T*E], inclusive
    rank = token_major_rank.index_select(0, source * routing_map.shape[1] + flat // num_tokens) - 1
    rows = torch.empty_like(rank).scatter_(0, rank, torch.arange(rank.numel(), device=rank.device))
    return flat, source, rows.view(num_tokens, topk), counts


def unpermute_dropless(permuted: torch.Tensor, source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute_dropless`: each token's sum over its top-k expert outputs.
    permuted: [T*topk, h]; source [T*topk] and rows [T, topk] from `permute_dropless` -> [T, h].
    The sum runs in fp32 for bf16 inputs (one rounding; Megatron's scatter_add rounds per add)."""
    return _GatherSum.apply(permuted, rows, source.unsqueeze(1))


def _drop_less_without_hooks(config) -> bool:
    """Settings under which every token has exactly top-k routes and nothing hooks into the
    dispatcher's stages (shared-expert overlap, CUDA graphs, router padding, fused permute)."""
    return (
        not config.moe_pad_expert_input_to_capacity
        and config.moe_expert_capacity_factor is None
        and not config.moe_router_padding_for_quantization
        and not config.moe_permute_fusion
        and not config.moe_shared_expert_overlap
        and config.cuda_graph_impl == "none"
        and hasattr(torch, "nonzero_static")
    )


def sync_free_dispatcher_for(config, megatron_dispatcher: type, ep_size: int, etp_size: int) -> type | None:
    """The dispatcher `MoELayerWithSyncFreeDispatch` puts in place of Megatron's
    `megatron_dispatcher` class for a layer with these expert-parallel / expert-tensor-parallel
    sizes, or None to keep Megatron's. `LocalTokenDispatcher` when one rank holds every expert
    whole (it groups tokens as both Megatron's all-to-all and all-gather dispatchers do);
    `SyncFreeAlltoAllDispatcher` / `SyncFreeAllGatherDispatcher` for Megatron's all-to-all /
    all-gather dispatcher otherwise; none unless routing is
    drop-less with a fixed top-k and nothing hooks into the dispatcher's stages."""
    if not _drop_less_without_hooks(config):
        return None
    if issubclass(megatron_dispatcher, (MoEAlltoAllTokenDispatcher, MoEAllGatherTokenDispatcher)) \
            and ep_size == 1 and etp_size == 1:
        return LocalTokenDispatcher
    if issubclass(megatron_dispatcher, MoEAlltoAllTokenDispatcher):
        return SyncFreeAlltoAllDispatcher
    if issubclass(megatron_dispatcher, MoEAllGatherTokenDispatcher):
        return SyncFreeAllGatherDispatcher
    return None


_MEGATRON_DISPATCHERS = {"alltoall": MoEAlltoAllTokenDispatcher, "allgather": MoEAllGatherTokenDispatcher}


def dispatch_description(config) -> str:
    """What the MoE layers of a model built from `config` (a TransformerConfig) will permute
    tokens with, for the start-up lines."""
    kind = config.moe_token_dispatcher_type
    ours = sync_free_dispatcher_for(config, _MEGATRON_DISPATCHERS.get(kind, type(None)),
                                    config.expert_model_parallel_size, config.expert_tensor_parallel_size)
    if ours is LocalTokenDispatcher:
        return "megatune's sync-free local permutation (every expert on each rank; layers/local_dispatch.py)"
    if ours is SyncFreeAlltoAllDispatcher:
        return "Megatron's all-to-all with megatune's sync-free permute/un-permute (layers/local_dispatch.py)"
    if ours is SyncFreeAllGatherDispatcher:
        return "Megatron's all-gather with megatune's gather permute/un-permute (layers/local_dispatch.py)"
    return f"Megatron's {kind} dispatcher"


class SyncFreeAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's all-to-all dispatcher with `permute_dropless` / `unpermute_dropless` in place of
    its permute and un-permute (see the module docstring). Same constructor and contract."""

    def _permute(self, hidden_states, routing_map, probs):
        """Record the shapes Megatron's later stages read, then permute [*, h] -> [T*topk, h]."""
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.hidden_shape_before_permute = hidden_states.shape
        permuted, permuted_probs, self.source, self.rows, counts = permute_dropless(
            hidden_states, routing_map, probs, self.config.moe_router_topk
        )
        return permuted, permuted_probs, counts

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """Megatron's split-size bookkeeping (and its one host copy, on a side stream), then the
        sync-free permute: ([T*topk, h] tokens grouped by expert, [T*topk] probs)."""
        self.tokens_per_expert = self.preprocess(routing_map)
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_1", self.tokens_per_expert)
        permuted, permuted_probs, _ = self._permute(hidden_states, routing_map, probs)
        return permuted, permuted_probs

    def combine_postprocess(self, permutated_local_input_tokens):
        """[T*topk, h] expert outputs back in token order, summed over each token's experts."""
        output = unpermute_dropless(permutated_local_input_tokens, self.source, self.rows)
        self.source = self.rows = None
        return output.view(self.hidden_shape)


class LocalTokenDispatcher(SyncFreeAlltoAllDispatcher):
    """The sync-free dispatcher for a rank that holds every expert: no communication and no
    bookkeeping for it (see the module docstring). Same constructor."""

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """[*, h] hidden states -> ([T*topk, h] tokens grouped by expert, [T*topk] probs)."""
        permuted, permuted_probs, self.tokens_per_expert = self._permute(hidden_states, routing_map, probs)
        return permuted, permuted_probs

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        return permutated_local_input_tokens, permuted_probs

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        """Returns (tokens, tokens per expert [E] on the GPU, probs); nothing to re-sort."""
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states):
        return hidden_states

    def token_combine(self, hidden_states, async_finish=True, allocate_on_comm_stream=True):
        return hidden_states


class SyncFreeAllGatherDispatcher(MoEAllGatherTokenDispatcher):
    """Megatron's all-gather dispatcher (tokens, routing map and probs all-gathered over the
    tensor x expert parallel group; expert outputs reduce-scattered back) with row gathers in
    place of its permute and un-permute.

    Megatron's version copies the local experts' token counts to the host and then runs
    `permute` (two more host syncs in `masked_select`) and a scatter_add un-permute. Here the
    gathered routing map [N, E] (N = T x TP x EP tokens, exactly top-k routes each) goes through
    `_dropless_routes` for all E experts; this rank's experts' routes are then one contiguous block
    [start, start + n) of the expert-major order. The two bounds are the only host copy (one per
    layer and micro-batch, as Megatron's all-to-all needs for its split sizes): it is queued right
    after the routing map's all-gather, so the GPU runs the hidden states' all-gather while the
    host waits for it. A token's rows outside the block are empty slots of the un-permute's
    gather-sum.

    Against the all-to-all dispatcher this moves each token once per rank (all-gather of [T, h],
    reduce-scatter of [N, h]) instead of top-k copies of it, and needs no chunk re-sort."""

    def token_dispatch(self, hidden_states, probs):
        """All-gathers the routing map, queues the host copy of this rank's block bounds, then
        all-gathers probs [T, E] -> [N, E] and hidden states [T, h] -> [N, h], and queues the
        index work that needs only the bounds on the device, so the GPU has it while the host
        waits for their copy."""
        if self.tp_size > 1 or self.ep_size > 1:
            with torch.no_grad():
                self.routing_map = gather_from_sequence_parallel_region(self.routing_map, group=self.tp_ep_group)
        flat, source, rows, counts = _dropless_routes(self.routing_map, self.router_topk)
        self.routes = flat, source  # read in dispatch_postprocess, once the block bounds are known
        first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        self.local_counts = counts[first:last]  # tokens per local expert, on the device
        start, n = counts[:first].sum(), self.local_counts.sum()  # 0-dim, on the device
        bounds = torch.stack([start, n])
        if bounds.is_cuda:  # an asynchronous copy the host waits for in dispatch_postprocess
            self.bounds = torch.empty(2, dtype=bounds.dtype, pin_memory=True).copy_(bounds, non_blocking=True)
            self.bounds_ready = torch.cuda.Event()
            self.bounds_ready.record()
        else:
            self.bounds, self.bounds_ready = bounds, None
        if self.tp_size > 1 or self.ep_size > 1:
            probs = gather_from_sequence_parallel_region(probs, group=self.tp_ep_group)
            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=self.tp_ep_group,
                                                                 use_global_buffer=True)
        # each token's rows inside the block, relative to it; n (an empty slot) for the others
        local_rows = torch.where((rows >= start) & (rows < start + n), rows - start, n)  # [N, top-k]
        if local_rows.shape[1] == 1:  # gather_sum reads one slot as a plain gather: no empty slots
            local_rows = torch.cat([local_rows, n.expand(local_rows.shape[0], 1)], dim=1)
        self.local_rows = local_rows
        return hidden_states, probs.t().reshape(-1)  # probs expert-major [E * N], as routes' flat index

    def dispatch_postprocess(self, hidden_states, probs):
        """[N, h] gathered tokens and their expert-major probs [E * N] -> ([n, h] this rank's
        routes grouped by local expert, tokens per local expert [E_local] on the device, their
        probs [n])."""
        self.hidden_shape_before_permute = hidden_states.shape
        if self.bounds_ready is not None:
            self.bounds_ready.synchronize()
        start, n = self.bounds.tolist()
        flat, source = self.routes
        local_counts = self.local_counts
        self.routes = self.local_counts = self.bounds = self.bounds_ready = self.routing_map = None
        self.local_source = source[start:start + n].unsqueeze(1)  # [n, 1]
        self.local_probs = probs.index_select(0, flat[start:start + n])
        permuted = _GatherSum.apply(hidden_states, self.local_source, self.local_rows)
        return permuted, local_counts, self.local_probs

    def combine_preprocess(self, hidden_states):
        """[n, h] expert outputs -> [N, h]: each gathered token's sum over this rank's experts
        (zero for a token routed elsewhere), for the reduce-scatter."""
        output = _GatherSum.apply(hidden_states, self.local_rows, self.local_source)
        self.local_rows = self.local_source = None
        return output

    def token_combine(self, hidden_states):
        """[N, h] partial sums -> [T, h]: Megatron's reduce-scatter over the TP x EP group.

        Megatron reduces in the probs' dtype (fp32): bf16 partials are cast up, summed and cast
        back. Over two ranks that is one addition of two bf16 numbers, rounded to fp32 and then
        to bf16, and a bf16 reduce-scatter (one addition of the pair, rounded once) gives the
        same bits with half the bytes on the link. The fp32 sum of two bf16 numbers (8
        significant bits each) is exact when their exponents differ by at most 15; otherwise the
        smaller is under 1/64 of the larger's half-ulp in bf16, so both round to the larger. The
        backward is the same bits too: Megatron all-gathers the bf16 gradients widened to fp32,
        this all-gathers them in bf16. Over more ranks a ring's partial sums would round in bf16,
        so Megatron's fp32 reduce-scatter runs there (and for fp16/fp32 activations)."""
        if self.tp_ep_group.size() == 2 and hidden_states.dtype == torch.bfloat16:
            return reduce_scatter_to_sequence_parallel_region(hidden_states, group=self.tp_ep_group)
        return super().token_combine(hidden_states)


class MoELayerWithSyncFreeDispatch(MoELayer):
    """Megatron's MoELayer with the dispatcher `sync_free_dispatcher_for` picks (Megatron's own
    where it picks none)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:  # as MoELayer does, so the dispatcher gets the same groups
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection)
        megatron = self.token_dispatcher
        cls = sync_free_dispatcher_for(self.config, type(megatron), megatron.ep_size, megatron.tp_size)
        if cls is None:
            return
        self.token_dispatcher = cls(
            self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection
        )

"""Token dispatch for a rank that holds every expert: no host sync, no identity re-sort.

With expert parallelism and expert tensor parallelism both 1 (one GPU, or pure data
parallelism) Megatron-core 0.16.1's all-to-all dispatcher still does work that only matters
when tokens travel between ranks:

- its `permute` finds each expert's tokens with `masked_select`, whose output length is
  data-dependent, so every call blocks the host until the GPU has caught up (twice: token
  indices and router probabilities);
- it copies the per-expert token counts to the host and waits for them (the
  `before_permutation_2` sync point), because its chunk re-sort needs Python split sizes;
- the re-sort itself (`sort_chunks_by_idxs`, forward and backward) splits the permuted tokens
  into one chunk per expert and concatenates them back in the same order: with one source
  rank the permutation is the identity, but it costs a full copy of the permuted activations.

Each blocking copy drains the GPU queue, so the GPU waits while the host launches the next
kernels: on the Qwen3-30B-A3B shape (128 experts, top-8) a third of the step was idle.

`LocalTokenDispatcher` keeps Megatron's contract and its token order, so the experts see
exactly the same inputs: tokens grouped by expert, each expert's tokens in ascending token
order (what `masked_select` over the [experts, tokens] routing map yields). It finds them with
`torch.nonzero_static`, whose output size is the static drop-less count tokens x top-k, and
hands the experts the counts as a GPU tensor (megatune's GroupedExperts builds its grouped-GEMM
offsets from them on the GPU; Megatron's SequentialMLP reads them with `.tolist()`, one sync
per layer as before). The un-permute is Megatron's own (`scatter_add`, no sync).

`MoELayerWithLocalDispatch` is Megatron's MoELayer that installs it when `local_dispatch_applies`.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)


def permute_dropless(tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor, topk: int):
    """Group tokens by expert without a host sync (drop-less routing: exactly `topk` experts per token).

    tokens: [T, h]; routing_map: [T, E] bool with `topk` True per row; probs: [T, E].
    Returns (permuted tokens [T*topk, h], their router probs [T*topk], source token index
    [T*topk] int64, tokens per expert [E] int64 on tokens' device). The order equals
    Megatron's `moe_utils.permute` (expert-major, ascending token index within an expert).

    Precondition: exactly T*topk routes in all. Megatron-core 0.16.1's top-k router gives every
    token (padding included: the padding mask only shapes the load-balancing loss) exactly
    `topk` experts when no capacity is set; `local_dispatch_applies` keeps this dispatcher off
    otherwise. A routing map that broke it would fail an asynchronous device assertion (a
    RuntimeError at the next sync), never pass silently.
    """
    num_tokens = routing_map.shape[0]
    counts = routing_map.sum(dim=0)
    torch._assert_async(counts.sum() == num_tokens * topk, "LocalTokenDispatcher: routes != tokens x top-k")
    expert_major = routing_map.t().reshape(-1)  # [E*T], index = expert * T + token
    flat = torch.nonzero_static(expert_major, size=num_tokens * topk).squeeze(1)
    source = flat % num_tokens
    permuted_probs = probs.t().reshape(-1).index_select(0, flat)
    return tokens.index_select(0, source), permuted_probs, source, counts


def local_dispatch_applies(config, dispatcher) -> bool:
    """Whether `dispatcher` (Megatron's all-to-all or all-gather one, just built) can be
    replaced by LocalTokenDispatcher (both group tokens as it does): one rank holds all
    experts whole, routing is drop-less with a fixed top-k, and no feature
    that hooks into the all-to-all's stages (shared-expert overlap, CUDA graphs, router
    padding, fused permute) is on."""
    return (
        isinstance(dispatcher, (MoEAlltoAllTokenDispatcher, MoEAllGatherTokenDispatcher))
        and dispatcher.ep_size == 1
        and dispatcher.tp_size == 1
        and not config.moe_pad_expert_input_to_capacity
        and config.moe_expert_capacity_factor is None
        and not config.moe_router_padding_for_quantization
        and not config.moe_permute_fusion
        and not config.moe_shared_expert_overlap
        and config.cuda_graph_impl == "none"
        and hasattr(torch, "nonzero_static")
    )


class LocalTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's all-to-all dispatcher with its communication and sync points removed, for
    a rank that holds every expert (see the module docstring). Same constructor."""

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """[*, h] hidden states -> ([T*topk, h] tokens grouped by expert, [T*topk] probs)."""
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.hidden_shape_before_permute = hidden_states.shape
        permuted, permuted_probs, self.reversed_local_input_permutation_mapping, self.tokens_per_expert = (
            permute_dropless(hidden_states, routing_map, probs, self.config.moe_router_topk)
        )
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


class MoELayerWithLocalDispatch(MoELayer):
    """Megatron's MoELayer; uses LocalTokenDispatcher where `local_dispatch_applies`."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:  # as MoELayer does, so the dispatcher gets the same groups
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection)
        if local_dispatch_applies(self.config, self.token_dispatcher):
            self.token_dispatcher = LocalTokenDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config,
                pg_collection=pg_collection,
            )

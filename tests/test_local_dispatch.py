"""layers/local_dispatch.py: the sync-free token permutation and the dispatchers built on it.

Compared with Megatron-core's own permute/unpermute and with a whole MoE layer (router,
dispatcher, experts) running Megatron's all-to-all and all-gather dispatchers on the same
weights and inputs. The permuted tokens, the router's and the experts' gradients are
bit-identical (only the bookkeeping differs); the un-permute sums each token's top-k expert
outputs in another order than Megatron's scatter_add (fp32: last-bit differences), so the
layer output and the input gradient are compared at fp32 round-off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

HIDDEN, FFN, EXPERTS, TOPK = 32, 16, 8, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Megatron's router puts its weight there


@pytest.fixture(scope="module")
def groups():
    from megatune.config import Config, validate
    from megatune.distributed import init_distributed, shutdown

    init_distributed(validate(Config(), 1), seed=1)
    yield
    shutdown()


def routing(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, EXPERTS, generator=g)
    probs, top = torch.topk(torch.softmax(logits, -1), TOPK, dim=-1)
    routing_map = torch.zeros(tokens, EXPERTS, dtype=torch.bool).scatter_(1, top, True)
    dense_probs = torch.zeros(tokens, EXPERTS).scatter_(1, top, probs)
    return torch.randn(tokens, HIDDEN, generator=g), routing_map, dense_probs


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_permute_dropless_equals_megatron_permute(tokens):
    from megatron.core.transformer.moe.moe_utils import permute

    from megatune.layers.local_dispatch import permute_dropless

    x, routing_map, probs = routing(tokens, seed=tokens)
    want_x, want_p, want_idx = permute(x, routing_map, probs=probs, num_out_tokens=tokens * TOPK)
    got_x, got_p, got_idx, rows, counts = permute_dropless(x, routing_map, probs, TOPK)
    assert torch.equal(got_idx, want_idx) and torch.equal(got_x, want_x) and torch.equal(got_p, want_p)
    assert counts.tolist() == routing_map.sum(0).tolist() and counts.sum() == tokens * TOPK
    # rows[t] are the permuted rows holding token t's copies, one per routed expert, in expert order
    assert sorted(rows.reshape(-1).tolist()) == list(range(tokens * TOPK))
    for t in range(tokens):
        assert got_idx[rows[t]].tolist() == [t] * TOPK
        experts = torch.searchsorted(torch.cumsum(counts, 0), rows[t], right=True)
        assert experts.tolist() == routing_map[t].nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_unpermute_dropless_and_both_backwards_equal_megatron(tokens):
    """Forward and backward of permute -> per-row scaling -> un-permute against Megatron's
    permute/unpermute (index_add/scatter_add): equal up to fp32 summation order."""
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from megatune.layers.local_dispatch import permute_dropless, unpermute_dropless

    x, routing_map, probs = routing(tokens, seed=tokens + 1)
    g = torch.Generator().manual_seed(3)
    out_grad = torch.randn(tokens, HIDDEN, generator=g)

    def run(fn):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf)
        (out * out_grad).sum().backward()
        return out.detach(), leaf.grad

    def megatron(leaf):
        permuted, permuted_probs, idx = permute(leaf, routing_map, probs=probs, num_out_tokens=tokens * TOPK)
        return unpermute(permuted * permuted_probs.unsqueeze(1), idx, restore_shape=leaf.shape)

    def ours(leaf):
        permuted, permuted_probs, source, rows, _ = permute_dropless(leaf, routing_map, probs, TOPK)
        return unpermute_dropless(permuted * permuted_probs.unsqueeze(1), source, rows)

    (want, want_grad), (got, got_grad) = run(megatron), run(ours)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got, (x * probs.sum(1, keepdim=True)), rtol=1e-5, atol=1e-6)  # sum_k p_k * x


def moe_layer(dispatcher_type: str, capacity=None, grouped=True):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from megatune.layers.spec import moe_spec

    tc = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=4 * HIDDEN,
        moe_ffn_hidden_size=FFN, num_moe_experts=EXPERTS, moe_router_topk=TOPK, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
        params_dtype=torch.float32, moe_grouped_gemm=grouped, moe_token_dispatcher_type=dispatcher_type,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        moe_expert_capacity_factor=capacity, moe_token_drop_policy="probs",
    )
    torch.manual_seed(0)
    return build_module(moe_spec(EXPERTS, grouped), config=tc, layer_number=1).to(DEVICE)


def fwd_bwd(layer, x, padding_mask):
    layer.zero_grad(set_to_none=True)
    x = x.to(DEVICE).clone().requires_grad_(True)
    out, _ = layer(x, padding_mask=padding_mask.to(DEVICE))
    g = torch.Generator().manual_seed(9)
    (out * torch.randn(out.shape, generator=g).to(DEVICE)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize(
    "dispatcher_type, ours",
    [("alltoall", "local"), ("allgather", "local"), ("alltoall", "sync_free_alltoall"),
     ("allgather", "sync_free_allgather")],
)
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_experts", "sequential_mlp"])
def test_moe_layer_with_sync_free_dispatch_equals_megatron_dispatcher(groups, dispatcher_type, ours, grouped):
    """`local`: the dispatcher the layer installs on one rank. `sync_free_alltoall` /
    `sync_free_allgather`: the ones it installs under expert parallelism (Megatron's
    communication stages around our permute), run here on one rank, where the communication
    and the chunk re-sort are the identity."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

    from megatune.layers.local_dispatch import (
        LocalTokenDispatcher,
        SyncFreeAllGatherDispatcher,
        SyncFreeAlltoAllDispatcher,
    )

    layer = moe_layer(dispatcher_type, grouped=grouped)
    assert type(layer.token_dispatcher) is LocalTokenDispatcher
    args = (layer.num_local_experts, layer.local_expert_indices)
    kwargs = dict(config=layer.config, pg_collection=get_default_pg_collection())
    if ours != "local":
        cls = SyncFreeAlltoAllDispatcher if ours == "sync_free_alltoall" else SyncFreeAllGatherDispatcher
        layer.token_dispatcher = cls(*args, **kwargs)
    megatron_cls = MoEAlltoAllTokenDispatcher if dispatcher_type == "alltoall" else MoEAllGatherTokenDispatcher
    reference = megatron_cls(*args, **kwargs)
    s, b = 6, 2
    x = torch.randn(s, b, HIDDEN, generator=torch.Generator().manual_seed(4))
    padding_mask = torch.zeros(b, s, dtype=torch.bool)
    padding_mask[1, 4:] = True  # the last two positions of sequence 1 are padding
    got = fwd_bwd(layer, x, padding_mask)
    local, layer.token_dispatcher = layer.token_dispatcher, reference
    want = fwd_bwd(layer, x, padding_mask)
    layer.token_dispatcher = local
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)  # output: un-permute's sum order
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)  # input grad: permute backward's sum
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert torch.equal(got[2][name], want[2][name]), name


def test_token_dropping_keeps_megatron_dispatcher(groups):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    layer = moe_layer("alltoall", capacity=1.0)
    assert type(layer.token_dispatcher) is MoEAlltoAllTokenDispatcher


@pytest.mark.parametrize("ep, etp", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("dispatcher_type", ["alltoall", "allgather"])
def test_dispatcher_choice_by_expert_layout(groups, ep, etp, dispatcher_type):
    """One rank with every expert: the local dispatcher. Experts spread over ranks (expert
    parallelism or expert tensor parallelism): Megatron's all-to-all / all-gather keeps its
    communication with our permute. Token dropping: Megatron's."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

    from megatune.layers.local_dispatch import (
        LocalTokenDispatcher,
        SyncFreeAllGatherDispatcher,
        SyncFreeAlltoAllDispatcher,
        dispatch_description,
        sync_free_dispatcher_for,
    )

    config = moe_layer(dispatcher_type).config
    megatron = MoEAlltoAllTokenDispatcher if dispatcher_type == "alltoall" else MoEAllGatherTokenDispatcher
    want = (LocalTokenDispatcher if (ep, etp) == (1, 1)
            else SyncFreeAlltoAllDispatcher if dispatcher_type == "alltoall" else SyncFreeAllGatherDispatcher)
    assert sync_free_dispatcher_for(config, megatron, ep, etp) is want
    dropping = moe_layer(dispatcher_type, capacity=1.0).config
    assert sync_free_dispatcher_for(dropping, megatron, ep, etp) is None
    config.expert_model_parallel_size, config.expert_tensor_parallel_size = ep, etp
    text = dispatch_description(config)
    assert ("local permutation" in text) == (want is LocalTokenDispatcher)
    assert ("all-to-all with megatune's" in text) == (want is SyncFreeAlltoAllDispatcher)
    assert ("all-gather with megatune's" in text) == (want is SyncFreeAllGatherDispatcher)
    config.moe_expert_capacity_factor = 1.0
    assert dispatch_description(config) == f"Megatron's {dispatcher_type} dispatcher"


def test_permute_dropless_refuses_a_routing_map_without_topk_routes_per_token():
    """Only the per-token count keeps `rows` right; a map with the right total must fail too."""
    from megatune.layers.local_dispatch import permute_dropless

    x, routing_map, probs = routing(5, seed=2)
    free = (~routing_map[4]).nonzero().squeeze(1)[:TOPK]
    routing_map[4, free] = True  # token 4 takes token 3's routes: the total T x top-k still holds
    routing_map[3] = False
    assert routing_map.sum() == 5 * TOPK
    with pytest.raises(RuntimeError, match="a token's routes != top-k"):
        permute_dropless(x, routing_map, probs, TOPK)


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("block, starved", [((0, 3), False), ((2, 5), False), ((5, 8), False), ((3, 4), False),
                                            ((6, 8), True)], ids=["experts0-2", "experts2-4", "experts5-7",
                                                                  "expert3", "experts6-7-get-no-token"])
def test_all_gather_dispatch_of_a_block_of_experts_equals_megatron(groups, block, starved, topk):
    """Under expert parallelism a rank holds a block of experts and sees every gathered token,
    some routed to none of its experts (with `starved`, every token). On one rank (the all-gather
    and the reduce-scatter are the identity) the dispatcher of a block is compared stage by stage
    with Megatron's: the permuted tokens, counts and probs (bit-equal), the un-permuted [N, h]
    partial sums and the gradients of both back to the tokens and probs (fp32 summation order).
    Top-1 routing gives one slot per token, most of them empty."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from megatune.layers.local_dispatch import SyncFreeAllGatherDispatcher

    config = moe_layer("allgather").config
    config.moe_router_topk = topk
    experts = list(range(*block))
    g = torch.Generator().manual_seed(block[0] + 10 * block[1] + 100 * topk)
    logits = torch.randn(23, EXPERTS, generator=g)
    if starved:
        logits[:, block[0]:block[1]] = -float("inf")
    top_probs, top = torch.topk(torch.softmax(logits, -1), topk, dim=-1)
    routing_map = torch.zeros(23, EXPERTS, dtype=torch.bool).scatter_(1, top, True).to(DEVICE)
    probs = torch.zeros(23, EXPERTS).scatter_(1, top, top_probs).to(DEVICE)
    x = torch.randn(23, HIDDEN, generator=g).to(DEVICE)
    out_grad = torch.randn(23, HIDDEN, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def run(cls):
        d = cls(len(experts), experts, config=config, pg_collection=get_default_pg_collection())
        leaf_x, leaf_p = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
        h, p = d.dispatch_preprocess(leaf_x.view(23, 1, HIDDEN), routing_map, leaf_p)
        h, p = d.token_dispatch(h, p)
        permuted, counts, permuted_probs = d.dispatch_postprocess(h, p)
        expert_out = permuted * permuted_probs.unsqueeze(1)  # what the experts do with probs, in small
        out = d.combine_postprocess(d.token_combine(d.combine_preprocess(expert_out)))
        (out.view(23, HIDDEN) * out_grad).sum().backward()
        return permuted.detach(), counts.cpu(), permuted_probs.detach(), out.detach(), leaf_x.grad, leaf_p.grad

    got, want = run(SyncFreeAllGatherDispatcher), run(MoEAllGatherTokenDispatcher)
    assert got[0].shape[0] == int(routing_map[:, block[0]:block[1]].sum())  # only this block's routes
    for i in range(3):
        assert torch.equal(got[i], want[i])
    for i in range(3, 6):
        torch.testing.assert_close(got[i], want[i], rtol=1e-6, atol=1e-6)
    routed_elsewhere = ~routing_map[:, block[0]:block[1]].any(1)
    assert routed_elsewhere.any() and (got[3].view(23, HIDDEN)[routed_elsewhere] == 0).all()
    assert routed_elsewhere.all() == starved


def _partial_sums(rank: int) -> torch.Tensor:
    """[8, 64] bf16 partial sums of one rank, built so the pair sums probe rounding: exponents
    2^-40..2^40 apart, then in row 0 ties at bf16's half-ulp, exact cancellation, signed zeros,
    subnormals, overflow and an infinity."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(8, 64, generator=g) * torch.exp2(torch.randint(-40, 41, (8, 64), generator=g).float())
    subnormal = 2.0 ** -130  # below bf16's smallest normal (2^-126), exactly representable
    if rank == 0:
        x[0, :8] = torch.tensor([1.0, 1.0 + 2 ** -7, 3.0, -0.0, subnormal, 3.0e38, float("inf"), 2 ** -126])
    else:
        x[0, :8] = torch.tensor([2 ** -8, 2 ** -8, -3.0, -0.0, subnormal, 3.0e38, 1.0, -subnormal])
    return x.to(torch.bfloat16)


def _combine_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from megatune.layers.local_dispatch import SyncFreeAllGatherDispatcher

    if torch.cuda.is_available():  # NCCL's own bf16 addition, one GPU per rank
        torch.cuda.set_device(rank)
        backend, device = "nccl", f"cuda:{rank}"
    else:
        from megatune.compat.cpu import enable_cpu_compat

        enable_cpu_compat()  # Megatron's reduce-scatter allocates on torch.cuda.current_device()
        backend, device = "gloo", "cpu"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from megatron.core.tensor_parallel import mappings

    reduce_scatter, link_dtypes = mappings.dist_reduce_scatter_func, []

    def recording_reduce_scatter(output, input_, group=None):
        link_dtypes.append(input_.dtype)
        return reduce_scatter(output, input_, group=group)

    mappings.dist_reduce_scatter_func = recording_reduce_scatter
    try:
        out = {}
        for cls in (SyncFreeAllGatherDispatcher, MoEAllGatherTokenDispatcher):
            d = cls.__new__(cls)  # token_combine reads only these attributes of a built dispatcher
            d.tp_size, d.ep_size, d.tp_ep_group = 1, 2, dist.group.WORLD
            d.local_probs = torch.zeros(1)  # Megatron's router probs are fp32: its reduce-scatter dtype
            partials = _partial_sums(rank).to(device).requires_grad_(True)
            combined = d.token_combine(partials)
            combined.backward(torch.randn(combined.shape, generator=torch.Generator().manual_seed(9 + rank))
                              .to(device, torch.bfloat16))
            out[cls.__name__] = (combined.detach().cpu(), partials.grad.cpu(), link_dtypes.pop())
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_rank_bf16_reduce_scatter_gives_megatrons_fp32_bits():
    """`SyncFreeAllGatherDispatcher.token_combine` reduce-scatters bf16 partial sums in bf16 over
    two ranks (half the bytes); Megatron's casts them to fp32 first. The outputs and the input
    gradients must be bit-equal, across exponent gaps, cancellation and rounding ties. gloo on
    CPU; NCCL where two GPUs are visible."""
    import torch.multiprocessing as mp

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("two ranks need two GPUs here (Megatron allocates the result on the current GPU)")

    from megatune.distributed import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_combine_worker, args=(free_port(), results), nprocs=2)
        got = dict(results)

    def bits(t):  # torch.equal counts -0.0 == 0.0; the bit patterns do not
        return t.view(torch.int16)

    want_sum = (_partial_sums(0).float() + _partial_sums(1).float()).to(torch.bfloat16)  # the formula
    for rank in (0, 1):
        ours, megatron = got[rank]["SyncFreeAllGatherDispatcher"], got[rank]["MoEAllGatherTokenDispatcher"]
        assert ours[0].dtype == torch.bfloat16 and ours[0].shape == (4, 64)
        assert torch.equal(bits(ours[0]), bits(megatron[0])) and torch.equal(bits(ours[1]), bits(megatron[1]))
        assert (ours[2], megatron[2]) == (torch.bfloat16, torch.float32)  # what crossed the link
        assert torch.equal(bits(ours[0]), bits(want_sum[4 * rank:4 * rank + 4]))
    row = got[0]["SyncFreeAllGatherDispatcher"][0][0, :8]
    assert row[:3].tolist() == [1.0, 1.0 + 2 ** -6, 0.0] and not row[2].signbit()  # ties to even; x - x = +0
    assert row[3] == 0 and row[3].signbit()  # -0 + -0 = -0
    assert row[4].item() == 2.0 ** -129 and row[5].item() == row[6].item() == float("inf")
    assert row[7].item() == 2.0 ** -126 - 2.0 ** -130  # a subnormal difference, kept exactly

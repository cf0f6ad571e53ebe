"""megatune's GroupedExperts against Megatron's SequentialMLP on the same weights (one process,
gloo): forward, backward (input, router-probability and weight gradients), the grouped_mm path
(forced on CPU, where torch implements it), parameter attributes, and a dist checkpoint written by
SequentialMLP loading into GroupedExperts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

HIDDEN, FFN, EXPERTS = 32, 16, 4
COUNTS = [5, 0, 7, 3]  # an expert with no tokens must still work (and get a zero gradient)


@pytest.fixture(scope="module")
def groups():
    from megatune.config import Config, validate
    from megatune.distributed import init_distributed, shutdown

    init_distributed(validate(Config(), 1), seed=1)
    yield
    shutdown()


def build(fusion: bool, grouped: bool):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatune.layers.experts import GroupedExperts

    tc = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=4 * HIDDEN,
        moe_ffn_hidden_size=FFN, num_moe_experts=EXPERTS, moe_router_topk=2, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=fusion,
        use_cpu_initialization=True, params_dtype=torch.float32, moe_grouped_gemm=grouped,
    )
    pg = ProcessGroupCollection.use_mpu_process_groups()
    if grouped:
        return GroupedExperts(EXPERTS, tc, None, pg)
    return SequentialMLP(EXPERTS, tc, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear), pg)


def pair(fusion: bool):
    torch.manual_seed(0)
    seq, grp = build(fusion, False), build(fusion, True)
    with torch.no_grad():
        for e, expert in enumerate(seq.local_experts):
            expert.linear_fc1.weight.normal_(0, 0.3)
            expert.linear_fc2.weight.normal_(0, 0.3)
            grp.weight1[e].copy_(expert.linear_fc1.weight)
            grp.weight2[e].copy_(expert.linear_fc2.weight)
    return seq, grp


def run(module, x, probs, grad):
    x = x.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    out, bias = module(x, torch.tensor(COUNTS), probs)
    assert bias is None
    (out * grad).sum().backward()
    return out, x.grad, probs.grad


def inputs():
    g = torch.Generator().manual_seed(3)
    n = sum(COUNTS)
    return torch.randn(n, HIDDEN, generator=g), torch.rand(n, generator=g), torch.randn(n, HIDDEN, generator=g)


@pytest.mark.parametrize("fusion", [True, False], ids=["fused_swiglu", "unfused"])
@pytest.mark.parametrize("grouped_mm", [False, True], ids=["loop", "grouped_mm"])
def test_grouped_experts_equal_sequential_mlp(groups, fusion, grouped_mm):
    seq, grp = pair(fusion)
    grp.force_grouped_mm = grouped_mm
    x, probs, grad = inputs()
    out_s, dx_s, dp_s = run(seq, x, probs, grad)
    out_g, dx_g, dp_g = run(grp, x, probs, grad)
    w1_grad = torch.stack([e.linear_fc1.weight.grad for e in seq.local_experts])
    w2_grad = torch.stack([e.linear_fc2.weight.grad for e in seq.local_experts])
    if not grouped_mm:  # the loop does SequentialMLP's arithmetic: identical bits
        for a, b in ((out_s, out_g), (dx_s, dx_g), (dp_s, dp_g), (w1_grad, grp.weight1.grad), (w2_grad, grp.weight2.grad)):
            assert torch.equal(a, b)
    else:
        for a, b in ((out_s, out_g), (dx_s, dx_g), (dp_s, dp_g), (w1_grad, grp.weight1.grad), (w2_grad, grp.weight2.grad)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(grp.weight1.grad[1]) == 0  # expert 1 had no tokens


@pytest.mark.parametrize("main_grad_dtype", [torch.float32, torch.bfloat16])
def test_gradient_accumulation_fusion_adds_expert_weight_grads_into_main_grad(groups, main_grad_dtype):
    """With `gradient_accumulation_fusion` and DDP's `main_grad` buffers, the grouped_mm path adds
    each micro-batch's weight gradient into main_grad itself and marks it done for DDP's hook;
    the input and router gradients are those of the plain grouped_mm path. Two backward passes
    accumulate (gradient accumulation over micro-batches)."""
    _, grp = pair(True)
    grp.force_grouped_mm = True
    x, probs, grad = inputs()
    out_plain, dx_plain, dp_plain = run(grp, x, probs, grad)
    want = {name: getattr(grp, name).grad.clone() for name in ("weight1", "weight2")}
    grp.zero_grad(set_to_none=True)

    grp.config.gradient_accumulation_fusion = True
    start = {}
    for name in want:
        w = getattr(grp, name)
        start[name] = torch.randn(w.shape, generator=torch.Generator().manual_seed(7)).to(main_grad_dtype)
        w.main_grad = start[name].clone()
        w.grad_added_to_main_grad = False
    expected = {name: t.clone() for name, t in start.items()}
    try:
        for _ in range(2):
            out, dx, dp = run(grp, x, probs, grad)
            assert torch.equal(out, out_plain) and torch.equal(dx, dx_plain) and torch.equal(dp, dp_plain)
            for name in want:
                w = getattr(grp, name)
                assert w.grad_added_to_main_grad and w.grad.shape == w.shape  # the unwritten stand-in
                expected[name].add_(want[name])  # what DDP's hook would do
                torch.testing.assert_close(w.main_grad, expected[name], rtol=1e-5, atol=1e-5)
    finally:
        grp.config.gradient_accumulation_fusion = False


def test_grouped_experts_parameter_attributes(groups):
    grp = build(True, True)
    assert grp.weight1.shape == (EXPERTS, 2 * FFN, HIDDEN) and grp.weight2.shape == (EXPERTS, HIDDEN, FFN)
    for w, dim in ((grp.weight1, 1), (grp.weight2, 2)):
        assert w.tensor_model_parallel and w.partition_dim == dim
        assert w.allreduce  # EP=1 here; with EP > 1 it is False (checked by the EP=2 runs' export)
    assert not grp.uses_grouped_mm(torch.zeros(1, HIDDEN))  # CPU: per-expert loop


def test_sequential_checkpoint_loads_into_grouped_experts(groups, tmp_path):
    from megatron.core import dist_checkpointing

    seq, grp_ref = pair(True)
    grp = build(True, True)
    with torch.no_grad():
        grp.weight1.zero_()
        grp.weight2.zero_()
    (tmp_path / "seq").mkdir()
    (tmp_path / "grp").mkdir()
    dist_checkpointing.save(seq.sharded_state_dict(prefix="mlp.experts."), str(tmp_path / "seq"))
    loaded = dist_checkpointing.load(grp.sharded_state_dict(prefix="mlp.experts."), str(tmp_path / "seq"))
    grp.load_state_dict({k.removeprefix("mlp.experts."): v for k, v in loaded.items()})
    assert torch.equal(grp.weight1, grp_ref.weight1) and torch.equal(grp.weight2, grp_ref.weight2)
    # and back: GroupedExperts' checkpoint into SequentialMLP
    dist_checkpointing.save(grp.sharded_state_dict(prefix="mlp.experts."), str(tmp_path / "grp"))
    seq2 = build(True, False)
    with torch.no_grad():
        for p in seq2.parameters():
            p.zero_()
    loaded = dist_checkpointing.load(seq2.sharded_state_dict(prefix="mlp.experts."), str(tmp_path / "grp"))
    seq2.load_state_dict({k.removeprefix("mlp.experts."): v for k, v in loaded.items()}, strict=False)
    for e, expert in enumerate(seq2.local_experts):
        assert torch.equal(expert.linear_fc1.weight, grp_ref.weight1[e])
        assert torch.equal(expert.linear_fc2.weight, grp_ref.weight2[e])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the experts here live on the CPU; with a GPU visible, "
                    "Megatron's DDP puts their main_grad buffers on it")
@pytest.mark.parametrize("overlap_grad_reduce", [False, True])
def test_fused_expert_weight_grads_under_megatron_ddp(groups, overlap_grad_reduce):
    """GroupedExperts (grouped_mm path, gradient_accumulation_fusion) inside Megatron's DDP, two
    micro-batches: DDP's hooks still fire (with overlap_grad_reduce a bucket whose hook never
    ran fails finish_grad_sync), add nothing twice, and main_grad ends as the sum of the plain
    path's weight gradients."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    _, grp = pair(True)
    grp.force_grouped_mm = True
    x, probs, grad = inputs()
    run(grp, x, probs, grad)
    want = {name: 2 * getattr(grp, name).grad.clone() for name in ("weight1", "weight2")}  # two micro-batches
    grp.zero_grad(set_to_none=True)

    grp.config.gradient_accumulation_fusion = True
    try:
        ddp = DistributedDataParallel(
            config=grp.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                                     use_distributed_optimizer=False),
            module=grp,
        )
        ddp.zero_grad_buffer()
        for micro_batch in range(2):
            if overlap_grad_reduce and micro_batch == 0:
                with ddp.no_sync():
                    run(ddp, x, probs, grad)
            else:
                run(ddp, x, probs, grad)
        ddp.finish_grad_sync()
        for name, expected in want.items():
            w = getattr(grp, name)
            assert w.grad is None  # DDP's hook took it (and added nothing: the flag was set)
            torch.testing.assert_close(w.main_grad, expected, rtol=1e-5, atol=1e-5)
    finally:
        grp.config.gradient_accumulation_fusion = False

"""Megatron-core's MoE layer (local spec: SequentialMLP experts) on CPU with gloo, through the
compat layer: EP=2 and TP=2 + sequence parallel, alltoall and allgather dispatchers, against a
plain-torch Qwen3-MoE reference (softmax router in fp32, top-k, renormalised, SwiGLU experts).

The 2-process part runs this file under torch.distributed.run (see `_worker`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

HIDDEN, FFN, EXPERTS, TOPK, SEQ, BATCH = 16, 8, 4, 2, 8, 2
CASES = [  # (name, tp, ep, dispatcher, aux_loss_coeff)
    ("ep2-alltoall", 1, 2, "alltoall", 0.0),
    ("ep2-allgather", 1, 2, "allgather", 0.0),
    ("tp2sp-alltoall", 2, 1, "alltoall", 0.0),
    ("tp2sp-allgather", 2, 1, "allgather", 0.0),
    ("ep2-alltoall-aux", 1, 2, "alltoall", 0.01),
    ("tp2sp-allgather-aux", 2, 1, "allgather", 0.01),
]


def reference_moe(x, router_w, gate, up, down):
    """Qwen3-MoE's sparse block in plain torch. x [tokens, h]; router_w [E, h];
    gate/up [E, f, h]; down [E, h, f]."""
    logits = x.float() @ router_w.float().t()
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top_p, top_i = torch.topk(probs, TOPK, dim=-1)
    top_p = top_p / top_p.sum(dim=-1, keepdim=True)  # norm_topk_prob
    out = torch.zeros_like(x)
    for e in range(router_w.shape[0]):
        y = (F.silu(x @ gate[e].t()) * (x @ up[e].t())) @ down[e].t()
        w = (top_p * (top_i == e)).sum(dim=-1, keepdim=True).to(x.dtype)
        out = out + w * y
    return out


def full_weights():
    g = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    return r(EXPERTS, HIDDEN), r(EXPERTS, FFN, HIDDEN), r(EXPERTS, FFN, HIDDEN), r(EXPERTS, HIDDEN, FFN)


def _run_case(name, tp, ep, dispatcher, aux_coeff):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from megatune.config import Config, validate
    from megatune.distributed import init_distributed

    config = Config()
    config.parallel.tensor_model_parallel_size = tp
    config.parallel.expert_model_parallel_size = ep
    config.parallel.sequence_parallel = tp > 1
    layout = validate(config, dist.get_world_size() if dist.is_initialized() else 2)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(layout, seed=1)

    tc = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,  # top-k of logits, softmax over the k = Qwen3 norm_topk_prob
        moe_router_topk_scaling_factor=None,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux_coeff else "none",
        moe_aux_loss_coeff=aux_coeff,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=tp > 1,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    layer = build_module(get_moe_module_spec(use_te=False, num_experts=EXPERTS, moe_grouped_gemm=False), config=tc)
    layer.train()
    layer.set_layer_number(1)  # the aux-loss tracker logs only layers with a number

    # Load the shards of one set of full weights (the same on every rank).
    router_w, gate, up, down = full_weights()
    ep_rank, etp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    n_local = EXPERTS // ep
    f = FFN // layout.etp
    fs = slice(etp_rank * f, (etp_rank + 1) * f)
    with torch.no_grad():
        layer.router.weight.copy_(router_w)
        for i, expert in enumerate(layer.experts.local_experts):
            e = ep_rank * n_local + i
            expert.linear_fc1.weight.copy_(torch.cat([gate[e][fs], up[e][fs]]))
            expert.linear_fc2.weight.copy_(down[e][:, fs])

    # Input: EP=2 (dp=2) gives each rank its own tokens; TP=2 + SP gives each rank a
    # sequence shard of the same tokens.
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(99 + (rank if tp == 1 else 0))
    x_full = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    shard = slice(ps.get_tensor_model_parallel_rank() * SEQ // tp, (ps.get_tensor_model_parallel_rank() + 1) * SEQ // tp)
    x = x_full[shard].clone().requires_grad_(True)
    out, bias = layer(x)
    assert bias is None
    w_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + rank))
    (out * w_out).sum().backward()

    x_ref = x_full.clone().requires_grad_(True)
    ref = reference_moe(x_ref.reshape(-1, HIDDEN), router_w, gate, up, down).reshape(SEQ, BATCH, HIDDEN)[shard]
    (ref * w_out).sum().backward()  # TP: other ranks' shards give no grad to this one
    result = {
        "case": name,
        "rank": rank,
        "out_diff": (out - ref).abs().max().item(),
        "grad_finite": bool(torch.isfinite(x.grad).all()),
        "router_grad_finite": bool(torch.isfinite(layer.router.weight.grad).all()),
    }
    result["close"] = torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    if not aux_coeff:
        result["grad_diff"] = (x.grad - x_ref.grad[shard]).abs().max().item()
        result["grad_close"] = torch.allclose(x.grad, x_ref.grad[shard], rtol=1e-5, atol=1e-5)
    else:
        # The aux loss reached the router: the input grads differ from the loss-free reference.
        result["aux_changed_grad"] = not torch.allclose(x.grad, x_ref.grad[shard], rtol=1e-5, atol=1e-5)
        # Megatron's switch loss over this rank's micro-batch (for TP+SP: the whole sequence):
        # E * sum_e f_e * P_e, f_e = tokens routed to e / (T * k), P_e = mean softmax prob.
        with torch.no_grad():
            tokens = x_full.reshape(-1, HIDDEN)
            p = torch.softmax(tokens @ router_w.t(), dim=-1)
            chosen = torch.zeros_like(p).scatter(1, torch.topk(p, TOPK, dim=-1).indices, 1.0)
            t = tokens.shape[0]
            expected = EXPERTS * ((chosen.sum(0) / (t * TOPK)) * (p.sum(0) / t)).sum()
        from megatron.core.transformer.moe import moe_utils

        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        logged = tracker["load_balancing_loss"]["values"].clone()
        # What a training loop calls to log it (z_loss is not tracked yet: force_initialize makes
        # its entry); reduces the tracker across ranks, then clears it.
        moe_utils.track_moe_metrics(
            loss_scale=1.0, iteration=1, force_initialize=True,
            track_names=["load_balancing_loss", "z_loss"], num_layers=1,
        )
        # Each TP rank holds its shard's share; the tracker reduce sums them.
        if tp > 1:
            dist.all_reduce(logged, group=ps.get_tensor_model_parallel_group())
        result["aux_diff"] = abs(logged[0].item() - expected.item())
        moe_utils.clear_aux_losses_tracker()
    return result


def _worker():
    """Entry point under torch.distributed.run: every case in turn, one JSON line per rank."""
    import torch.distributed as dist

    import megatune.distributed as md

    dist.init_process_group("gloo")
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else [c[0] for c in CASES]
    results = []
    for case in CASES:
        if case[0] in names:
            try:
                results.append(_run_case(*case))
            except Exception as exc:  # report every failing case, not only the first
                import traceback

                traceback.print_exc()
                results.append({"case": case[0], "rank": dist.get_rank(), "error": repr(exc)[:500]})
    # Both ranks share one stdout pipe: take turns, one write per line (print's separate
    # newline write let the two lines run together).
    for rank in range(dist.get_world_size()):
        if rank == dist.get_rank():
            sys.stdout.write("RESULT " + json.dumps(results) + "\n")
            sys.stdout.flush()
        dist.barrier()
    md.shutdown()


def _launch(names=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), __file__]
    if names:
        cmd.append(",".join(names))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    results = [r for line in proc.stdout.splitlines() if line.startswith("RESULT ")
               for r in json.loads(line[len("RESULT "):])]
    return proc, results


def _free_port():
    from megatune.distributed import free_port

    return free_port()


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is inactive with CUDA")


@cpu_only
def test_moe_layer_matches_reference_on_two_gloo_processes():
    proc, results = _launch()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(results) == 2 * len(CASES), proc.stdout[-2000:] + proc.stderr[-4000:]
    for r in results:
        assert "error" not in r, r
        assert r["close"] and r["out_diff"] < 1e-4, r  # measured <= 6e-6 (outputs are O(1-10))
        assert r["grad_finite"] and r["router_grad_finite"], r
        if "grad_diff" in r:
            assert r["grad_close"], r
        else:  # aux-loss cases
            assert r["aux_changed_grad"] and r["aux_diff"] < 1e-5, r


def test_router_gating_linear_without_te_uses_torch_mm():
    from megatune.compat.fixes import FIXES, enable_megatron_fixes
    from megatron.core.transformer.moe import moe_utils

    assert all(f in enable_megatron_fixes() for f in FIXES)
    if not moe_utils.HAVE_TE:
        assert moe_utils.te_general_gemm is None
    inp = torch.randn(3, 2, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    logits = moe_utils.router_gating_linear(inp, weight, None, torch.float32)  # NameError before
    assert logits.dtype == torch.float32 and logits.shape == (3, 2, 4)
    torch.testing.assert_close(logits, inp.float() @ weight.float().t())
    logits.sum().backward()
    assert inp.grad.dtype == torch.bfloat16 and weight.grad.shape == weight.shape


@cpu_only
def test_token_dispatcher_streams_are_no_ops():
    from megatune.compat import cpu
    from megatron.core.transformer.moe import token_dispatcher

    cpu.enable_cpu_compat()
    stream = token_dispatcher.torch.cuda.Stream()  # MoEAlltoAllTokenDispatcher.__init__
    stream.wait_stream(token_dispatcher.torch.cuda.current_stream())
    with token_dispatcher.torch.cuda.stream(stream):
        pass
    stream.record_event().synchronize()
    assert token_dispatcher.torch.Tensor is torch.Tensor


@cpu_only
def test_dispatcher_split_sizes_become_numpy_like_on_gpu():
    import numpy as np

    from megatune.compat import cpu
    from megatron.core.transformer.moe import token_dispatcher

    cpu.enable_cpu_compat()
    move = token_dispatcher.maybe_move_tensor_to_cpu
    splits = move(torch.tensor([16, 18]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [16, 18]
    t = torch.tensor([1, 2])
    assert move(t) is t and move(None, as_numpy=True) is None


@cpu_only
def test_moe_metrics_tracker_initialises_on_cpu():
    from megatune.compat import cpu
    from megatron.core.transformer.moe import moe_utils

    cpu.enable_cpu_compat()
    assert moe_utils.torch.zeros(2, device="cuda").device.type == "cpu"
    assert moe_utils.torch.Tensor is torch.Tensor


if __name__ == "__main__":
    _worker()

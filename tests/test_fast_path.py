"""The torch-native fast path (layers/fused.py, layers/cross_entropy.py, engine/optim.py's fused
Adam switch) against the plain formulas it replaces. On CPU the pieces run their eager formula
(the same code the compiled CUDA kernels are traced from); on CUDA the compiled kernels run and
the same tests compare them with the plain path in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatune.layers import fused
from megatune.layers.cross_entropy import fused_linear_cross_entropy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _plain_rms_norm(x, w, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(6, 2, 64), (5, 2, 4, 16)])  # hidden norm [s,b,h]; q/k norm [s,b,heads,d]
def test_rms_norm_matches_plain_formula_and_grads(device, shape):
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(device, dtype)
    out, (gx, gw) = _grads(lambda a, b: fused.rms_norm(a, b, 1e-6), x, w)
    ref, (rx, rw) = _grads(lambda a, b: _plain_rms_norm(a, b, 1e-6), x, w)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # bf16: one rounding of the output
    assert _rel(out, ref) < tol and _rel(gx, rx) < tol and _rel(gw, rw) < tol


def test_rms_norm_against_torch_functional():
    """An independent formula: torch's own F.rms_norm in fp64."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 3, 32, generator=gen, dtype=torch.float64), torch.randn(32, generator=gen, dtype=torch.float64)
    assert torch.allclose(fused.rms_norm(x, w, 1e-5), F.rms_norm(x, (32,), w, 1e-5), atol=1e-12)


def test_rms_norm_module_switch_and_sequence_parallel_flag():
    from megatron.core.transformer import TransformerConfig

    from megatune.layers.norm import RMSNorm

    def make(fused_flag):
        tc = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                               persist_layer_norm=fused_flag)
        tc.sequence_parallel = True  # what the module reads for the flag; no TP group needed here
        return RMSNorm(tc, 16)

    plain, fast = make(False), make(True)
    assert not plain.fused and fast.fused and fast.weight.sequence_parallel
    with torch.no_grad():
        plain.weight.copy_(torch.linspace(0.5, 1.5, 16))
        fast.weight.copy_(plain.weight)
    x = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(2))
    (plain(x) ** 2).sum().backward()
    (fast(x) ** 2).sum().backward()
    assert torch.allclose(fast(x), plain(x), atol=1e-6)
    assert torch.allclose(fast.weight.grad, plain.weight.grad, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rot_dim", [16, 8])  # full rotary and partial (channels past rot_dim pass through)
def test_rope_matches_megatron_unfused(device, rot_dim):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    gen = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t = torch.randn(7, 2, 3, 16, generator=gen).to(device, dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    ang = torch.outer(torch.arange(7).float(), inv)
    freqs = torch.cat((ang, ang), -1)[:, None, None, :].to(device)
    out, (g,) = _grads(lambda a: fused.rotary(a, freqs), t)
    ref, (r,) = _grads(lambda a: _apply_rotary_pos_emb_bshd(a, freqs), t)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert _rel(out, ref) < tol and _rel(g, r) < tol
    if rot_dim < 16:
        assert torch.equal(out[..., rot_dim:], t[..., rot_dim:])


def _plain_linear_ce(hidden, weight, labels):
    """GPTModel's plain path: logits in the operands' dtype, then fp32 cross-entropy."""
    logits = hidden @ weight.t()  # [s, b, V]
    return F.cross_entropy(logits.float().permute(1, 2, 0), labels, reduction="none")  # [b, s]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 5, 4096])  # chunk of 1 token, a ragged last chunk, one chunk
def test_linear_cross_entropy_matches_full_logits(device, chunk):
    gen = torch.Generator().manual_seed(4)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    s, b, h, v = 6, 2, 32, 50
    hidden = torch.randn(s, b, h, generator=gen).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.2).to(device, dtype)
    labels = torch.randint(0, v, (b, s), generator=gen).to(device)
    out, (gh, gw) = _grads(lambda a, w: fused_linear_cross_entropy(a, w, labels, chunk), hidden, weight)
    ref, (rh, rw) = _grads(lambda a, w: _plain_linear_ce(a, w, labels), hidden, weight)
    assert out.shape == (b, s) and out.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel(out, ref) < tol and _rel(gh, rh) < tol and _rel(gw, rw) < tol


def test_linear_cross_entropy_masked_upstream_grad():
    """A loss mask (zero upstream gradient on some tokens) must zero their contribution, as the
    trainer's loss_func does with prompt tokens."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, 1, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (1, 5), generator=gen)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]])
    (fused_linear_cross_entropy(hidden, weight, labels, 2) * mask).sum().backward()
    assert torch.all(hidden.grad[0] == 0) and torch.all(hidden.grad[3] == 0)
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    (_plain_linear_ce(h2, w2, labels) * mask).sum().backward()
    assert torch.allclose(hidden.grad, h2.grad, atol=1e-5) and torch.allclose(weight.grad, w2.grad, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab_size", [None, 41], ids=["whole_vocab", "padded_vocab"])
@pytest.mark.parametrize("scale", [1.0, 0.125, 0.0])
def test_linear_cross_entropy_gradient_in_forward(device, vocab_size, scale):
    """With `token_weights` (pt/sft's masked token sum) the gradient is formed in the forward:
    same losses, and the gradients of `scale * sum(losses * mask)` equal the general path's
    (which recomputes the logits in the backward), also over a padded vocabulary."""
    gen = torch.Generator().manual_seed(14)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    s, b, h, v = 7, 2, 32, 50
    hidden = torch.randn(s, b, h, generator=gen).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.2).to(device, dtype)
    labels = torch.randint(0, vocab_size or v, (b, s), generator=gen).to(device)
    mask = torch.rand(b, s, generator=gen).to(device) > 0.4

    def loss(weights):
        return lambda a, w: fused_linear_cross_entropy(a, w, labels, 3, vocab_size=vocab_size, token_weights=weights)

    def reduce(fn):
        return lambda a, w: (fn(a, w) * mask).sum().reshape(1) * scale  # one scalar: upstream c * mask

    got, (gh, gw) = _grads(reduce(loss(mask)), hidden, weight)
    want, (rh, rw) = _grads(reduce(loss(None)), hidden, weight)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.equal(loss(mask)(hidden, weight), loss(None)(hidden, weight))
    if scale:
        assert _rel(got, want) < tol and _rel(gh, rh) < tol and _rel(gw, rw) < tol
    else:
        assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    if vocab_size:
        assert torch.count_nonzero(gw[vocab_size:]) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_gradient_in_forward_scales_bf16_gradients_in_fp32(device):
    """The backward's scale c (the loss's 1/tokens, a loss scale) multiplies the bf16 gradients
    in fp32 before their one rounding: c = 1 + 3 * 2^-10 rounds to 1.0 in bf16, which would bias
    the whole gradient by 0.3%."""
    gen = torch.Generator().manual_seed(16)
    s, b, h, v = 64, 2, 64, 50
    hidden = torch.randn(s, b, h, generator=gen).to(device, torch.bfloat16)
    weight = (torch.randn(v, h, generator=gen) * 0.2).to(device, torch.bfloat16)
    labels = torch.randint(0, v, (b, s), generator=gen).to(device)
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    scale = 1 + 3 * 2**-10

    def grads(c):
        a, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        ((fused_linear_cross_entropy(a, w, labels, 16, token_weights=mask) * mask).sum() * c).backward()
        return a.grad.float(), w.grad.float()

    for unscaled, scaled in zip(grads(1.0), grads(scale)):
        ratio = float((scaled * unscaled).sum() / (unscaled * unscaled).sum())
        assert abs(ratio - scale) < 3e-4, ratio


def test_linear_cross_entropy_gradient_in_forward_leaves_a_frozen_weight_alone():
    gen = torch.Generator().manual_seed(17)
    hidden = torch.randn(5, 1, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen)  # frozen
    labels = torch.randint(0, 11, (1, 5), generator=gen)
    mask = torch.ones(1, 5, dtype=torch.bool)
    fused_linear_cross_entropy(hidden, weight, labels, 2, token_weights=mask).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    fused_linear_cross_entropy(hidden, weight, labels, 2).sum().backward()
    assert weight.grad is None and torch.allclose(got, hidden.grad, atol=1e-6)


def test_linear_cross_entropy_gradient_in_forward_refuses_other_upstream_gradients():
    """Per-token upstream gradients that are not c * token_weights (e.g. DPO's per-sequence
    sums) must not pass silently through the gradient-in-forward path."""
    gen = torch.Generator().manual_seed(15)
    hidden = torch.randn(5, 1, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (1, 5), generator=gen)
    losses = fused_linear_cross_entropy(hidden, weight, labels, 2, token_weights=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="not c \\* token_weights"):
        (losses * torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0]])).sum().backward()


def test_linear_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(torch.zeros(4, 2, 8), torch.zeros(10, 8), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_cross_entropy(torch.zeros(4, 2, 8), torch.zeros(10, 6), torch.zeros(2, 4, dtype=torch.long))


def test_wgrad_accumulation_adds_into_fp32_buffer():
    gen = torch.Generator().manual_seed(6)
    main = torch.randn(5, 3, generator=gen)
    g, x = torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen)
    want = main + g.t() @ x
    fused.TorchWgradAccumulation.wgrad_gemm_accum_fp32(x, g, main)
    assert torch.allclose(main, want, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_add_into_main_grad_equals_eager_add(device):
    gen = torch.Generator().manual_seed(11)
    main = torch.randn(4, 300, 17, generator=gen).to(device)
    grad = torch.randn(4, 300, 17, generator=gen).to(device=device, dtype=torch.bfloat16)
    want = main.clone().add_(grad)
    fused.add_into_main_grad(main, grad)
    assert torch.equal(main, want)  # bf16 -> fp32 is exact, one fp32 add either way


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_linear_adds_weight_grad_into_main_grad(device):
    """layers/experts.py's _GroupedLinear (gradient_accumulation_fusion) against grouped_mm's own
    autograd: same output and input gradient, weight gradient added into main_grad."""
    from megatune.layers.experts import _GroupedLinear, grouped_mm_fn

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(12)
    counts = torch.tensor([48, 0, 80, 16])
    x = torch.randn(int(counts.sum()), 64, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(4, 32, 64, generator=gen).to(device=device, dtype=dtype)
    offs = torch.cumsum(counts, 0).to(device=device, dtype=torch.int32)
    out_plain, (dx_plain, dw_plain) = _grads(lambda a, b: grouped_mm_fn()(a, b.transpose(1, 2), offs=offs), x, w)
    leaf_x, leaf_w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    leaf_w.main_grad = torch.ones(w.shape, device=device)
    leaf_w.grad_added_to_main_grad = False
    out = _GroupedLinear.apply(leaf_x, leaf_w, offs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    (out * upstream).sum().backward()
    assert torch.equal(out.detach(), out_plain) and torch.equal(leaf_x.grad, dx_plain)
    assert leaf_w.grad_added_to_main_grad
    assert torch.allclose(leaf_w.main_grad, 1 + dw_plain.float(), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(leaf_w.main_grad[1] - 1) == 0  # the expert with no tokens


@pytest.mark.parametrize("device", DEVICES)
def test_foreach_inf_norm_propagates_nan_and_inf(device):
    """engine/step.py's finite-gradient check relies on it."""
    gen = torch.Generator().manual_seed(13)
    ts = [torch.randn(n, generator=gen).to(device) for n in (5000, 70000, 3)]
    assert all(torch.isfinite(n) for n in torch._foreach_norm(ts, ord=float("inf")))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i, where in ((0, 4999), (1, 12345), (2, 0)):
            poisoned = [t.clone() for t in ts]
            poisoned[i][where] = bad
            norms = torch._foreach_norm(poisoned, ord=float("inf"))
            assert not torch.isfinite(norms[i]) and all(torch.isfinite(n) for j, n in enumerate(norms) if j != i)


def test_foreach_norm_and_scale_match_loops():
    gen = torch.Generator().manual_seed(8)
    ts = [torch.randn(n, generator=gen) for n in (3, 10, 1)]
    norm, _ = fused.foreach_l2_norm(0, None, [ts], False)
    assert torch.allclose(norm, torch.cat(ts).norm().reshape(1))
    dst = [torch.zeros(t.shape, dtype=torch.float64) for t in ts]
    fused.foreach_scale(0, None, [ts, dst], 0.5)
    assert all(torch.allclose(d, (t * 0.5).double()) for d, t in zip(dst, ts))
    copies = [t.clone() for t in ts]
    fused.foreach_scale(0, None, [copies, copies], 2.0)
    assert all(torch.allclose(c, 2 * t) for c, t in zip(copies, ts))


def test_enable_fast_path_lets_megatron_accept_rope_fusion():
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import TransformerConfig

    fused.enable_fast_path()
    assert rope_utils.fused_apply_rotary_pos_emb is fused.fused_apply_rotary_pos_emb
    tc = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, apply_rope_fusion=True)
    assert tc.apply_rope_fusion


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's fused Adam runs on CUDA")
def test_fused_adam_switch_matches_foreach():
    from megatune.engine.optim import _steps_on_device

    params = [torch.randn(100, device="cuda", generator=torch.Generator("cuda").manual_seed(i)) for i in range(3)]
    a = [p.clone().requires_grad_(True) for p in params]
    b = [p.clone().requires_grad_(True) for p in params]
    oa, ob = torch.optim.AdamW(a, lr=1e-2), torch.optim.AdamW(b, lr=1e-2)
    for g in ob.param_groups:
        g["fused"], g["foreach"] = True, False
    ob.register_step_pre_hook(_steps_on_device)
    for step in range(3):
        for x, y in zip(a, b):
            x.grad = torch.full_like(x, 0.1 * (step + 1))
            y.grad = x.grad.clone()
        oa.step(), ob.step()
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


def test_chunked_cross_entropy_runs_the_output_layers_forward_pre_hooks():
    """The chunked path reads the output layer's weight without calling the layer. With
    `overlap_param_gather`, Megatron's DDP waits in the layer's forward pre-hook for the weight's
    all-gather. So the hook must still run, once per forward, before the weight is read.
    Skipping it made an untied Qwen3-8B fail on the next step (`assert
    self.param_gather_handle is None`; reproduced on CPU with benchmarks/throughput.py
    --gpus 2 --set overlap_grad_reduce=true overlap_param_gather=true ddp_bucket_size=20000)."""
    import types

    from megatune.layers.cross_entropy import use_fused_linear_cross_entropy

    gen = torch.Generator().manual_seed(8)
    s, b, h, v = 5, 2, 8, 13
    output_layer = torch.nn.Linear(h, v, bias=False)
    seen = []

    def gather_wait(module, args):  # stands in for DDP's hook: the weight becomes ready here
        seen.append(args[0].shape)
        with torch.no_grad():
            module.weight.copy_(ready)

    ready = torch.randn(v, h, generator=gen)
    output_layer.register_forward_pre_hook(gather_wait)
    model = types.SimpleNamespace(post_process=True, share_embeddings_and_output_weights=False,
                                  output_layer=output_layer, config=types.SimpleNamespace(mtp_num_layers=None),
                                  _postprocess=lambda *a, **k: pytest.fail("the plain path ran"))
    use_fused_linear_cross_entropy(model, chunk_tokens=4)
    hidden = torch.randn(s, b, h, generator=gen)
    labels = torch.randint(0, v, (b, s), generator=gen)
    loss = model._postprocess(hidden, None, None, labels)
    assert seen == [hidden.shape]
    torch.testing.assert_close(loss, _plain_linear_ce(hidden, ready, labels))

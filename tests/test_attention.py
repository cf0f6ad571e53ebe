"""Packed (document-bounded) attention: the CUDA varlen path's glue, checked on CPU.

torch's varlen kernel needs CUDA and half precision, so here it is replaced by stand-ins with
the keyword sets of torch 2.10 (`is_causal`, fixed 1/sqrt(dim) scale, no GQA) and of torch 2.12
(`window_size`, `scale`, `enable_gqa`) that compute, per document, exactly what the kernel
computes. Each must equal the masked SDPA path on the same packed batch; the device run in
docs/train.md checks the real kernel against the masked path on an H200.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatune.layers import attention
from megatune.layers.attention import document_causal_mask, varlen_causal_attention


def _per_document(q, k, v, cu, scale, causal):
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [heads, n, dim]
        out.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(out)


def kernel_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    assert key.shape[1] == query.shape[1], "2.10 has no GQA: K/V heads must be repeated"
    return _per_document(query, key, value, cu_seq_q, 1 / math.sqrt(query.shape[-1]), is_causal)


def kernel_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    assert enable_gqa == (key.shape[1] != query.shape[1])
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return _per_document(query, key, value, cu_seq_q, scale, causal=window_size == (-1, 0))


@pytest.mark.parametrize("kernel", [kernel_2_10, kernel_2_12])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_glue_equals_the_masked_path(monkeypatch, kernel, kv_heads):
    monkeypatch.setattr(attention, "varlen_kernel", lambda: kernel)
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)  # a one-token document included
    t, heads, dim, scale = 16, 4, 8, 0.3  # a scale other than 1/sqrt(dim)
    q = torch.randn(t, heads, dim, requires_grad=True)
    k = torch.randn(t, kv_heads, dim, requires_grad=True)
    v = torch.randn(t, kv_heads, dim, requires_grad=True)
    out = varlen_causal_attention(q, k, v, cu, 7, scale)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))

    mask = document_causal_mask(cu, t, q.device)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
        enable_gqa=kv_heads != heads,
    )[0].transpose(0, 1)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_varlen_path_is_only_taken_where_the_kernel_runs(monkeypatch):
    from types import SimpleNamespace as NS

    ok = attention.SDPAttention._varlen_ok
    monkeypatch.setattr(attention, "varlen_kernel", lambda: kernel_2_12)
    monkeypatch.setattr(attention, "sm80_or_newer", lambda device: True)

    def cuda(dtype=torch.bfloat16, dim=128):
        return NS(is_cuda=True, dtype=dtype, shape=(16, 4, dim), device="cuda:0")

    train, infer = NS(dropout=0.0, training=True), NS(dropout=0.1, training=False)
    assert ok(train, cuda()) and ok(train, cuda(torch.float16)) and ok(train, cuda(dim=256))
    assert ok(infer, cuda())  # dropout only matters in training
    assert not ok(NS(dropout=0.1, training=True), cuda())  # the kernel has no dropout
    assert not ok(train, cuda(torch.float32))
    assert not ok(train, cuda(dim=100)) and not ok(train, cuda(dim=512))  # head sizes flash lacks
    assert not ok(train, torch.zeros(2, 2, 8, dtype=torch.bfloat16))  # CPU
    monkeypatch.setattr(attention, "sm80_or_newer", lambda device: False)  # V100, T4
    assert not ok(train, cuda())
    monkeypatch.setattr(attention, "sm80_or_newer", lambda device: True)
    monkeypatch.setattr(attention, "varlen_kernel", lambda: None)  # torch < 2.10
    assert not ok(train, cuda())

"""layers/gather_sum.py: the MoE permute's row gather-sum, with empty slots.

On CPU the formula is checked against a loop and through autograd (as `_GatherSum` uses it, both
directions); on CUDA the Triton kernel is checked against the formula for the dtypes, row
lengths and slot counts the dispatchers give it (these run on the GPU machine,
docs/results/session7_gpu_tests.log)."""

from __future__ import annotations

import pytest
import torch

from megatune.layers.gather_sum import _gather_sum_formula, gather_sum


def random_index(tokens: int, slots: int, rows: int, empty_share: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, max(rows, 1), (tokens, slots), generator=g)
    return torch.where(torch.rand(tokens, slots, generator=g) < empty_share, rows, index) if rows else index * 0


def loop_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(index.shape[0], *x.shape[1:], dtype=torch.float64)
    for i, row in enumerate(index.tolist()):
        for r in row:
            if r < x.shape[0]:
                out[i] += x[r].double()
    return out


@pytest.mark.parametrize("empty_share", [0.0, 0.5, 1.0])
def test_gather_sum_adds_the_filled_slots_only(empty_share):
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    index = random_index(11, 4, 7, empty_share, seed=1)
    torch.testing.assert_close(gather_sum(x, index), loop_reference(x, index))


def test_one_slot_is_a_row_gather_and_no_rows_give_zeros():
    x = torch.randn(6, 4)
    index = torch.tensor([[5], [0], [5]])
    assert torch.equal(gather_sum(x, index), x[[5, 0, 5]])
    empty = torch.zeros(0, 4)
    assert torch.equal(gather_sum(empty, torch.zeros(3, 2, dtype=torch.long)), torch.zeros(3, 4))


def test_gather_sum_refuses_an_index_past_the_empty_slot_or_not_int64():
    with pytest.raises(IndexError):
        gather_sum(torch.randn(3, 2), torch.tensor([[0, 4]]))
    with pytest.raises(TypeError, match="int64"):
        gather_sum(torch.randn(3, 2), torch.tensor([[0, 1]], dtype=torch.int32))


def test_gather_sum_through_autograd_in_both_directions():
    """As `_GatherSum` uses it: the sum over a token's rows (with empty slots) and the row
    gather are each other's gradient."""
    from megatune.layers.local_dispatch import _GatherSum

    source = torch.tensor([[0], [2], [2]])  # row r of x came from token source[r]
    rows = torch.tensor([[0, 3], [3, 3], [1, 2]])  # token t's rows of x (3: empty)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: _GatherSum.apply(t, rows, source), (x,))
    tokens = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: _GatherSum.apply(t, source, rows), (tokens,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("row_shape, slots, empty_share", [((2048,), 8, 0.0), ((2048,), 8, 0.5), ((3000,), 2, 0.3),
                                                           ((2047,), 8, 0.5), ((4, 3, 5), 3, 0.2), ((32,), 8, 1.0)])
def test_triton_kernel_equals_the_formula(dtype, row_shape, slots, empty_share):
    from megatune.layers.gather_sum import _triton_kernel

    assert _triton_kernel() is not None
    x = torch.randn(999, *row_shape[:-1], 2 * row_shape[-1], device="cuda", dtype=dtype)[..., ::2]  # strided
    index = random_index(1234, slots, 999, empty_share, seed=sum(row_shape) + slots).cuda()
    index = index.t().contiguous().t()  # column-major
    got, want = gather_sum(x, index), _gather_sum_formula(x.double(), index)
    # one rounding of the fp32 sum to `dtype` (bf16: 2^-8 relative); fp32 sums in another order
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    assert got.dtype == dtype and got.shape == (1234, *row_shape)
    assert torch.equal(gather_sum(x[:0], index.clamp(max=0)), torch.zeros_like(got))  # no rows: all empty
    assert gather_sum(x, index[:0]).shape == (0, *row_shape)

import pytest
import torch

from megatune.models.mappings import ColumnParallel, FusedGateUp, FusedQKV, Replicated, RowParallel, Shapes


class DictSource:
    """In-memory TensorSource that records how many elements each read returned."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.elements_read = 0

    def read_shape(self, name):
        return list(self.tensors[name].shape)

    def read(self, name, dim=None, start=0, stop=None):
        t = self.tensors[name]
        if dim is not None:
            t = t.narrow(dim, start, stop - start)
        self.elements_read += t.numel()
        return t.clone()


SHAPES = Shapes(num_heads=8, num_groups=4, head_dim=3)
HIDDEN = 5


def qkv_tensors(bias: bool):
    gen = torch.Generator().manual_seed(0)
    rest = () if bias else (HIDDEN,)
    return {
        "q": torch.randn(8 * 3, *rest, generator=gen),
        "k": torch.randn(4 * 3, *rest, generator=gen),
        "v": torch.randn(4 * 3, *rest, generator=gen),
    }


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_layout_matches_megatron_group_interleave(bias):
    t = qkv_tensors(bias)
    fused = FusedQKV("x", "q", "k", "v").load(DictSource(t), None, 0, 1, SHAPES)
    # Megatron: for each group, its 2 query heads, then its key head, then its value head.
    expected = []
    for g in range(4):
        expected += [t["q"][g * 6:(g + 1) * 6], t["k"][g * 3:(g + 1) * 3], t["v"][g * 3:(g + 1) * 3]]
    assert torch.equal(fused, torch.cat(expected))


@pytest.mark.parametrize(
    "mapping, names",
    [
        (FusedQKV("x", "q", "k", "v"), ("q", "k", "v")),
        (FusedGateUp("x", "gate", "up"), ("gate", "up")),
        (ColumnParallel("x", "w"), ("w",)),
        (RowParallel("x", "w"), ("w",)),
        (Replicated("x", "w"), ("w",)),
    ],
)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_unshard_is_identity_and_reads_only_own_slice(mapping, names, tp):
    gen = torch.Generator().manual_seed(1)
    if names == ("q", "k", "v"):
        tensors = qkv_tensors(bias=False)
    else:
        tensors = {n: torch.randn(16, 8, generator=gen) for n in names}
    shards = []
    for rank in range(tp):
        src = DictSource(tensors)
        shards.append(mapping.load(src, None, rank, tp, SHAPES))
        total = sum(t.numel() for t in tensors.values())
        expected_read = total if mapping.tp_dim is None else total // tp
        assert src.elements_read == expected_read
    if mapping.tp_dim is None:
        assert all(torch.equal(s, shards[0]) for s in shards)
    rebuilt = mapping.unshard(shards, None, SHAPES)
    assert rebuilt.keys() == tensors.keys()
    for name in names:
        assert torch.equal(rebuilt[name], tensors[name])


def test_fused_gate_up_rank_holds_its_gate_then_its_up():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    shard = FusedGateUp("x", "g", "u").load(DictSource({"g": gate, "u": up}), None, 1, 2, SHAPES)
    assert torch.equal(shard, torch.cat([gate[2:], up[2:]]))


def test_layer_pattern_extracts_global_layer():
    mapping = RowParallel("decoder.layers.{layer}.mlp.linear_fc2.weight", "model.layers.{layer}.mlp.down_proj.weight")
    match = mapping.pattern().match("decoder.layers.17.mlp.linear_fc2.weight")
    assert match and match.group("layer") == "17"
    assert not mapping.pattern().match("decoder.layers.17.mlp.linear_fc1.weight")

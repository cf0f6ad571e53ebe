"""Parameter mappings between Hugging Face and Megatron names, with the sharding math.

A family lists mappings; the loader and exporter only ever talk to these types. Each mapping
knows how to read *its own slice* of the HF tensors for one tensor-parallel rank (`load`) and how
to rebuild the HF tensors from every rank's shard (`unshard`). Names may contain `{layer}`, the
global decoder-layer index, and `{expert}` (see `for_expert`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Protocol

import torch


class TensorSource(Protocol):
    """Reads tensors, or slices of them, from a checkpoint without loading whole files."""

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Shapes:
    """Attention geometry needed to (de)interleave fused QKV, and the vocabulary's rows: the
    HF vocabulary and the Megatron rows it is padded to (layers/vocab_padding.py); 0 = not
    padded (the HF tensor's own row count)."""

    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int = 0
    padded_vocab_size: int = 0


class Mapping:
    megatron: str
    tp_dim: int | None = None  # dim Megatron splits across TP ranks; None = replicated

    def hf_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def load(self, src: TensorSource, layer: int | None, rank: int, size: int, shapes: Shapes) -> torch.Tensor:
        raise NotImplementedError

    def unshard(self, shards: list[torch.Tensor], layer: int | None, shapes: Shapes) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pattern(self) -> re.Pattern:
        escaped = re.escape(self.megatron).replace(r"\{layer\}", r"(?P<layer>\d+)")
        return re.compile("^" + escaped.replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")


def for_expert(mapping: Mapping, megatron_index: int, hf_index: int) -> Mapping:
    """The mapping of one expert: `{expert}` in Megatron names is the rank-local index, in HF
    names the global one (expert e lives on EP rank e // local_count)."""
    values = {}
    for f in dataclasses.fields(mapping):
        value = getattr(mapping, f.name)
        if isinstance(value, str):
            index = megatron_index if f.name == "megatron" else hf_index
            value = value.replace("{expert}", str(index))
        values[f.name] = value
    return dataclasses.replace(mapping, **values)


def _fmt(name: str, layer: int | None) -> str:
    return name.format(layer=layer) if layer is not None else name


def _chunk(length: int, rank: int, size: int, name: str) -> tuple[int, int]:
    if length % size:
        raise ValueError(f"{name}: dimension {length} is not divisible by {size} parallel ranks")
    part = length // size
    return rank * part, (rank + 1) * part


@dataclass(frozen=True)
class Direct(Mapping):
    """One HF tensor, one Megatron tensor; split along `tp_dim` (None = every rank has it all).

    tp_dim=0 is column-parallel (and vocab-parallel embeddings), tp_dim=1 row-parallel.
    """

    megatron: str
    hf: str
    tp_dim: int | None = None

    def hf_names(self):
        return (self.hf,)

    def load(self, src, layer, rank, size, shapes):
        name = _fmt(self.hf, layer)
        if self.tp_dim is None or size == 1:
            return src.read(name)
        length = src.read_shape(name)[self.tp_dim]
        start, stop = _chunk(length, rank, size, name)
        return src.read(name, self.tp_dim, start, stop)

    def unshard(self, shards, layer, shapes):
        full = shards[0] if self.tp_dim is None else torch.cat(shards, dim=self.tp_dim)
        return {_fmt(self.hf, layer): full}


@dataclass(frozen=True)
class VocabParallel(Mapping):
    """HF [vocab, h] embedding / output weight <-> Megatron's vocab-parallel shard of a table
    padded to `shapes.padded_vocab_size` rows (layers/vocab_padding.py). Rank r of `size` holds
    padded rows [r*n, (r+1)*n), n = padded / size: it reads only the real ones among them and
    fills the rest with zeros; `unshard` drops the padding, so export returns the HF tensor bit
    for bit. Without padding this is a column-parallel `Direct`.
    Raises ValueError when the padded table is smaller than the HF one or does not split."""

    megatron: str
    hf: str
    tp_dim: int | None = 0

    def hf_names(self):
        return (self.hf,)

    def load(self, src, layer, rank, size, shapes):
        name = _fmt(self.hf, layer)
        rows = src.read_shape(name)[0]
        padded = shapes.padded_vocab_size or rows
        if padded < rows:
            raise ValueError(f"{name}: {rows} vocabulary rows do not fit a table of {padded}")
        start, stop = _chunk(padded, rank, size, name)
        real = src.read(name, 0, min(start, rows), min(stop, rows))
        missing = (stop - start) - real.shape[0]
        if missing == 0:
            return real
        return torch.cat([real, real.new_zeros(missing, *real.shape[1:])])

    def unshard(self, shards, layer, shapes):
        full = torch.cat(shards, dim=0)
        if shapes.vocab_size:
            full = full[: shapes.vocab_size]
        return {_fmt(self.hf, layer): full}


def Replicated(megatron: str, hf: str) -> Direct:
    return Direct(megatron, hf, None)


def ColumnParallel(megatron: str, hf: str) -> Direct:
    return Direct(megatron, hf, 0)


def RowParallel(megatron: str, hf: str) -> Direct:
    return Direct(megatron, hf, 1)


@dataclass(frozen=True)
class FusedQKV(Mapping):
    """HF q/k/v projections <-> Megatron `linear_qkv`, interleaved per query group.

    Megatron stores, for each KV group g: the group's query heads, then its key head, then its
    value head. Groups are split contiguously across TP ranks, so a rank reads only its heads.
    Works for weights ([out, in]) and biases ([out]).
    """

    megatron: str
    q: str
    k: str
    v: str
    tp_dim: int | None = 0

    def hf_names(self):
        return (self.q, self.k, self.v)

    def load(self, src, layer, rank, size, shapes):
        groups_per_rank = shapes.num_groups // size
        heads_per_group = shapes.num_heads // shapes.num_groups
        d = shapes.head_dim
        g0 = rank * groups_per_rank
        q = src.read(_fmt(self.q, layer), 0, g0 * heads_per_group * d, (g0 + groups_per_rank) * heads_per_group * d)
        k = src.read(_fmt(self.k, layer), 0, g0 * d, (g0 + groups_per_rank) * d)
        v = src.read(_fmt(self.v, layer), 0, g0 * d, (g0 + groups_per_rank) * d)
        rest = q.shape[1:]
        q = q.reshape(groups_per_rank, heads_per_group * d, *rest)
        k = k.reshape(groups_per_rank, d, *rest)
        v = v.reshape(groups_per_rank, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def unshard(self, shards, layer, shapes):
        full = torch.cat(shards, dim=0)
        heads_per_group = shapes.num_heads // shapes.num_groups
        d = shapes.head_dim
        rest = full.shape[1:]
        grouped = full.reshape(shapes.num_groups, (heads_per_group + 2) * d, *rest)
        q, k, v = torch.split(grouped, [heads_per_group * d, d, d], dim=1)
        return {
            _fmt(self.q, layer): q.reshape(-1, *rest).contiguous(),
            _fmt(self.k, layer): k.reshape(-1, *rest).contiguous(),
            _fmt(self.v, layer): v.reshape(-1, *rest).contiguous(),
        }


@dataclass(frozen=True)
class FusedGateUp(Mapping):
    """HF gate/up projections <-> Megatron `linear_fc1`: each TP rank holds [gate_r; up_r]."""

    megatron: str
    gate: str
    up: str
    tp_dim: int | None = 0

    def hf_names(self):
        return (self.gate, self.up)

    def load(self, src, layer, rank, size, shapes):
        parts = []
        for name in (_fmt(self.gate, layer), _fmt(self.up, layer)):
            start, stop = _chunk(src.read_shape(name)[0], rank, size, name)
            parts.append(src.read(name, 0, start, stop))
        return torch.cat(parts, dim=0)

    def unshard(self, shards, layer, shapes):
        gates, ups = zip(*(torch.chunk(s, 2, dim=0) for s in shards))
        return {
            _fmt(self.gate, layer): torch.cat(gates, dim=0),
            _fmt(self.up, layer): torch.cat(ups, dim=0),
        }


# ---- stacked experts (megatune GroupedExperts) ------------------------------------------------
#
# One Megatron tensor holds every local expert of a layer: [num_local_experts, out, in]. The HF
# names carry `{expert}` (the global index); `first_expert`/`num_experts` are this EP rank's
# experts, filled in by the loader (`for_local_experts`). The tensor-parallel rank/size passed to
# `load` are the expert-tensor-parallel ones, which shard the FFN dim.


def for_local_experts(mapping: "StackedMapping", first: int, count: int) -> "StackedMapping":
    return dataclasses.replace(mapping, first_expert=first, num_experts=count)


class StackedMapping(Mapping):
    stacked = True  # covers all local experts at once (see models/weights.py resolve)
    first_expert: int = 0
    num_experts: int = 0

    def _experts(self):
        return range(self.first_expert, self.first_expert + self.num_experts)


def _expert_name(name: str, layer: int | None, expert: int) -> str:
    return _fmt(name.replace("{expert}", str(expert)), layer)


@dataclass(frozen=True)
class StackedGateUp(StackedMapping):
    """HF per-expert gate/up projections [ffn, hidden] <-> [local experts, 2*ffn/etp, hidden],
    each expert holding [gate_r; up_r] of its ETP rank (as Megatron's fc1)."""

    megatron: str
    gate: str
    up: str
    tp_dim: int | None = 1
    first_expert: int = 0
    num_experts: int = 0

    def hf_names(self):
        return (self.gate, self.up)

    def load(self, src, layer, rank, size, shapes):
        experts = []
        for e in self._experts():
            parts = []
            for name in (_expert_name(self.gate, layer, e), _expert_name(self.up, layer, e)):
                start, stop = _chunk(src.read_shape(name)[0], rank, size, name)
                parts.append(src.read(name, 0, start, stop))
            experts.append(torch.cat(parts, dim=0))
        return torch.stack(experts)

    def unshard(self, shards, layer, shapes):
        gates, ups = zip(*(torch.chunk(s, 2, dim=1) for s in shards))
        gate, up = torch.cat(gates, dim=1), torch.cat(ups, dim=1)
        out = {}
        for i, e in enumerate(self._experts()):
            out[_expert_name(self.gate, layer, e)] = gate[i].contiguous()
            out[_expert_name(self.up, layer, e)] = up[i].contiguous()
        return out


@dataclass(frozen=True)
class StackedDown(StackedMapping):
    """HF per-expert down projections [hidden, ffn] <-> [local experts, hidden, ffn/etp]."""

    megatron: str
    hf: str
    tp_dim: int | None = 2
    first_expert: int = 0
    num_experts: int = 0

    def hf_names(self):
        return (self.hf,)

    def load(self, src, layer, rank, size, shapes):
        experts = []
        for e in self._experts():
            name = _expert_name(self.hf, layer, e)
            start, stop = _chunk(src.read_shape(name)[1], rank, size, name)
            experts.append(src.read(name, 1, start, stop))
        return torch.stack(experts)

    def unshard(self, shards, layer, shapes):
        full = torch.cat(shards, dim=2)
        return {_expert_name(self.hf, layer, e): full[i].contiguous() for i, e in enumerate(self._experts())}

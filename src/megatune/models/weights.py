"""Move weights between an HF safetensors folder and Megatron model chunks, any TP/PP layout.

Names: Megatron holds `decoder.layers.<local>`; the mapping tables use the global layer index,
which each layer knows (`layer_number` is 1-based and already includes the pipeline offset).
"""

from __future__ import annotations


import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatune.models.build import ModelBundle
from megatune.models.hf_io import (
    CheckpointError,
    SafetensorsSource,
    ShardWriter,
    clear_old_weights,
    finalize_shards,
    write_side_files,
)
from megatune.models.mappings import Mapping, for_expert, for_local_experts

_LOCAL_LAYER = re.compile(r"^((?:\w+\.)*?)decoder\.layers\.(\d+)\.")  # (wrapper prefix, local index)
# Transformer Engine fuses the pre-attention/pre-MLP norms into the next linear.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
OUTPUT_LAYER = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


def global_params(chunk: torch.nn.Module):
    """Yield (global Megatron name, parameter) for every parameter of one model chunk. A
    wrapper (e.g. a vision-language model) may hold the decoder under a prefix."""
    for name, param in chunk.named_parameters():
        match = _LOCAL_LAYER.match(name)
        if match:
            prefix = match.group(1)
            layer = chunk.get_submodule(f"{prefix}decoder.layers")[int(match.group(2))].layer_number - 1
            name = f"{prefix}decoder.layers.{layer}." + name[match.end():]
        for te_name, local_name in _TE_ALIASES.items():
            name = name.replace(te_name, local_name)
        yield name, param


@dataclass(frozen=True)
class Resolved:
    mapping: Mapping  # concrete: any `{expert}` already filled in
    layer: int | None
    expert: bool  # sharded over expert-parallel / expert-tensor-parallel ranks


def resolve(bundle: ModelBundle, name: str) -> Resolved:
    if name == OUTPUT_LAYER and bundle.tied:
        # With pipeline parallelism the last stage keeps its own copy of the tied embedding.
        name = EMBEDDING
    for mapping in bundle.mappings:
        match = mapping.pattern().match(name)
        if match:
            groups = match.groupdict()
            layer = int(groups["layer"]) if groups.get("layer") is not None else None
            per_rank = (bundle.config.num_moe_experts or 0) // ps.get_expert_model_parallel_world_size()
            first = ps.get_expert_model_parallel_rank() * per_rank
            if getattr(mapping, "stacked", False):  # one tensor holds all of this EP rank's experts
                return Resolved(for_local_experts(mapping, first, per_rank), layer, True)
            if groups.get("expert") is None:
                return Resolved(mapping, layer, False)
            local = int(groups["expert"])
            return Resolved(for_expert(mapping, local, first + local), layer, True)
    raise KeyError(f"no {bundle.provider.model_type} mapping for Megatron parameter '{name}'")


def _tp(expert: bool) -> tuple[int, int, object]:
    """(rank, size, group) of the tensor-parallel group that shards this kind of parameter."""
    if expert:
        return (
            ps.get_expert_tensor_parallel_rank(),
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_group(),
        )
    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_group(),
    )


@torch.no_grad()
def load_hf_weights(bundle: ModelBundle, model_dir: str) -> int:
    """Fill every parameter of this rank from the HF folder, reading only this rank's slices.

    Returns the number of parameters loaded; raises if any shape disagrees.
    """
    src = SafetensorsSource(model_dir)
    count = 0
    for chunk in bundle.chunks:
        for name, param in global_params(chunk):
            r = resolve(bundle, name)
            rank, size, _ = _tp(r.expert)
            value = r.mapping.load(src, r.layer, rank, size, bundle.shapes)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{model_dir}: {r.mapping.hf_names()} (layer {r.layer}) gives shape "
                    f"{tuple(value.shape)} for Megatron '{name}', which expects {tuple(param.shape)}"
                )
            param.copy_(value)
            count += 1
    return count


@torch.no_grad()
def export_hf(
    bundle: ModelBundle,
    src_dir: str,
    out_dir: str,
    dtype: torch.dtype,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Gather the model into an HF folder. Collective: every rank must call it.

    Each pipeline stage's first data-parallel, first tensor-parallel rank writes its own
    layers, flushing a shard file whenever it reaches `max_shard_bytes`; experts are written by
    the first expert-data-parallel, first expert-tensor-parallel rank of each expert-parallel
    rank (each holds different experts). No rank ever holds more than its own parameters plus one
    shard. Rank 0 then names the shards and writes the index.
    """
    out = Path(out_dir)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        clear_old_weights(out)
    dist.barrier()
    writes = {
        False: ps.get_data_parallel_rank() == 0,
        True: ps.get_expert_data_parallel_rank() == 0,
    }
    writer = ShardWriter(out, f"rank{dist.get_rank():05d}", max_shard_bytes)
    for chunk in bundle.chunks:
        for name, param in global_params(chunk):
            if name == OUTPUT_LAYER and bundle.tied:
                continue  # HF ties lm_head to the embedding; the first stage writes it
            r = resolve(bundle, name)
            if not writes[r.expert]:
                continue
            rank, size, group = _tp(r.expert)
            if r.mapping.tp_dim is None or size == 1:
                shards = [param]
            else:
                shards = [torch.empty_like(param) for _ in range(size)]
                dist.all_gather(shards, param.contiguous(), group=group)
            if rank == 0:
                for hf_name, tensor in r.mapping.unshard([s.cpu() for s in shards], r.layer, bundle.shapes).items():
                    writer.add(hf_name, tensor.to(dtype))
    writer.flush()
    all_files: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_files, (dist.get_rank(), writer.files))
    if dist.get_rank() == 0:
        ordered = [f for _, files in sorted(all_files, key=lambda x: x[0]) for f in files]
        finalize_shards(out, ordered)
        write_side_files(Path(src_dir), out, dtype)
    dist.barrier()

"""`megatune env`: versions, devices and which kernels megatune will use."""

from __future__ import annotations

import importlib.metadata
import platform

import torch


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_lines() -> list[str]:
    from megatune.layers.spec import choose_backend

    backend = choose_backend()
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices = f"{len(names)} x CUDA ({', '.join(sorted(set(names)))}), backend nccl"
    else:
        devices = f"CPU only ({torch.get_num_threads()} threads), backend gloo with megatune's CPU compatibility layer"
    return [
        f"megatune: {_version('megatune')}",
        f"python: {platform.python_version()}",
        f"torch: {torch.__version__}",
        f"megatron-core: {_version('megatron-core')}",
        f"transformers: {_version('transformers')}",
        f"transformer-engine: {_version('transformer-engine')}",
        f"devices: {devices}",
        f"layer backend: {backend.name}",
        f"  attention: {backend.attention}",
        f"  norms: {backend.norm}",
        f"  MoE experts: {backend.moe_experts}",
    ]

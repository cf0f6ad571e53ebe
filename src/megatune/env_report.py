"""`megatune env`: what a bug report needs (as `llamafactory-cli env`): versions, optional
pieces present, devices, and which kernels megatune will use."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

# (what the user knows it as, distribution name, import name)
OPTIONAL = (
    ("matplotlib (plot_loss)", "matplotlib", "matplotlib"),
    ("tensorboard (report_to)", "tensorboard", "tensorboard"),
    ("wandb (report_to)", "wandb", "wandb"),
    ("swanlab (report_to)", "swanlab", "swanlab"),
    ("pillow (images)", "pillow", "PIL"),
    ("liger-kernel", "liger-kernel", "liger_kernel"),
)


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def optional_lines() -> list[str]:
    """One line per optional package: its version, or "not installed" (found without importing it)."""
    out = []
    for label, dist_name, module in OPTIONAL:
        present = importlib.util.find_spec(module) is not None
        out.append(f"  {label}: {_version(dist_name) if present else 'not installed'}")
    return out


def fast_path_line() -> str:
    """Whether the GPU fast path (layers/fused.py: compiled norms/RoPE, Megatron's fused SwiGLU)
    can run here: it needs CUDA."""
    if not torch.cuda.is_available():
        return "GPU fast path (fused kernels): off (no CUDA; the plain formulas run)"
    return "GPU fast path (fused kernels): available (on by default: bias_activation_fusion, apply_rope_fusion, ...)"


def env_lines() -> list[str]:
    from megatune.layers.spec import choose_backend

    backend = choose_backend()
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices = f"{len(names)} x CUDA ({', '.join(sorted(set(names)))}), backend nccl"
        gpus = f"GPU: {', '.join(sorted(set(names)))} x {len(names)}"
    else:
        devices = f"CPU only ({torch.get_num_threads()} threads), backend gloo with megatune's CPU compatibility layer"
        gpus = "GPU: none"
    return [
        f"megatune: {_version('megatune')}",
        f"platform: {platform.platform()}",
        f"python: {platform.python_version()}",
        f"torch: {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"megatron-core: {_version('megatron-core')}",
        f"transformers: {_version('transformers')}",
        f"datasets: {_version('datasets')}",
        f"transformer-engine: {_version('transformer-engine')}",
        gpus,
        f"devices: {devices}",
        "optional:",
        *optional_lines(),
        fast_path_line(),
        f"layer backend: {backend.name}",
        f"  attention: {backend.attention}",
        f"  norms: {backend.norm}",
        f"  MoE experts: {backend.moe_experts}",
    ]

"""Process-group and Megatron parallel-state set-up: NCCL on GPU, gloo (with the CPU shims) otherwise."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatune.compat.cpu import enable_cpu_compat
from megatune.compat.fixes import enable_megatron_fixes
from megatune.config import Layout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(layout: Layout, seed: int, timeout_s: int = 1800) -> None:
    """Join (or create, when run alone) the process group and build Megatron's parallel groups."""
    enable_cpu_compat()
    enable_megatron_fixes()
    if torch.cuda.is_available():
        from megatune.layers.fused import enable_fast_path

        enable_fast_path()  # Megatron refuses the fusion flags unless their kernels are installed
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kwargs = {}
        if "MASTER_ADDR" not in os.environ:
            kwargs["init_method"] = f"tcp://127.0.0.1:{free_port()}"
        if torch.cuda.is_available():  # bound to this rank's GPU: no "guessing device ID" / barrier warnings
            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(
            backend,
            rank=int(os.environ.get("RANK", 0)),
            world_size=world_size_from_env(),
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)  # on CPU the compat layer backs it with CPU RNG


def shutdown() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

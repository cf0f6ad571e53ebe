"""Make Megatron-core run on CPU-only hosts (gloo), so CI and laptops exercise the real engine.

Megatron-core assumes CUDA in a few places. Each patch below names the Megatron call that needs
it; all are applied only when CUDA is absent, where the original code would raise anyway, so no
working GPU behaviour can change. Patches target a Megatron module's attribute where that is
enough; `torch.cuda.current_device` is patched once on `torch.cuda` because Megatron calls it
from well over a hundred sites in dozens of modules.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from megatune.compat.patching import Patch, apply_patches

_APPLIED: list[Patch] = []


def _cpu_device() -> torch.device:
    return torch.device("cpu")


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: on CPU all work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuCuda:
    """`torch.cuda` as seen by a patched Megatron module: streams and events become no-ops."""

    Stream = _NullStream
    Event = _NullStream

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)


def _to_cpu_device(kwargs: dict) -> dict:
    dev = kwargs.get("device")
    if dev is not None and torch.device(dev).type == "cuda":
        kwargs["device"] = "cpu"
    return kwargs


class _CpuTorch:
    """`torch` as seen by a patched Megatron module: tensor factories given device="cuda" get
    the CPU instead, and `torch.cuda` streams are no-ops. Everything else is the real torch."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        return torch.zeros(*args, **_to_cpu_device(kwargs))

    @staticmethod
    def ones(*args, **kwargs):
        return torch.ones(*args, **_to_cpu_device(kwargs))

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **_to_cpu_device(kwargs))

    @staticmethod
    def tensor(*args, **kwargs):
        return torch.tensor(*args, **_to_cpu_device(kwargs))


def _cpu_torch(_original):
    return _CpuTorch()


def _with_tensor_method(name: str, make_method: Callable[[Any], Any]):
    """Patch factory: run the original with `torch.Tensor.<name>` replaced for the duration of
    the call only (Megatron calls a Tensor method we cannot reach through a module attribute)."""

    def make(original):
        def wrapper(*args, **kwargs):
            saved = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, make_method(saved))
            try:
                return original(*args, **kwargs)
            finally:
                setattr(torch.Tensor, name, saved)

        return wrapper

    return make


_with_tensor_cuda_as_identity = _with_tensor_method("cuda", lambda saved: lambda self, *a, **k: self)


def _cuda_type_name(saved):
    """Tensor.type() without arguments names the CUDA type ('torch.cuda.FloatTensor')."""

    def type_(self, *args, **kwargs):
        if args or kwargs:
            return saved(self, *args, **kwargs)
        return saved(self).replace("torch.", "torch.cuda.", 1)

    return type_


_with_cuda_type_names = _with_tensor_method("type", _cuda_type_name)


def _cpu_l2_norm(original):
    """Megatron's local multi-tensor L2 norm (used without apex/TE) returns its result on
    device='cuda'; the same sum-of-squares norm, on the CPU."""

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = [torch.linalg.vector_norm(t.float()) for tensors in tensor_lists for t in tensors]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        return total.reshape(1), None

    return l2_norm


def _splits_as_numpy(original):
    """The alltoall dispatcher moves its split sizes to the host with
    moe_utils.maybe_move_tensor_to_cpu(..., as_numpy=True), which only converts CUDA tensors;
    on CPU they stay tensors and reach all_to_all_single as tensors. Convert CPU tensors the
    same way, so the dispatcher sees what it sees on a GPU."""

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


PATCHES: list[Patch] = [
    Patch(
        "torch.cuda",
        "current_device",
        lambda orig: _cpu_device,
        "tensor_parallel.layers/mappings, rotary embeddings, p2p_communication and the optimizer "
        "allocate with device=torch.cuda.current_device(); on CPU that must be the CPU.",
    ),
    Patch(
        "megatron.core.pipeline_parallel.schedules",
        "torch",
        _cpu_torch,
        "forward_backward_* count tokens in torch.zeros(..., device='cuda').",
    ),
    Patch(
        "megatron.core.pipeline_parallel.p2p_communication",
        "torch",
        _cpu_torch,
        "pipeline send/recv (_communicate_shapes, _communicate) call torch.cuda.synchronize().",
    ),
    Patch(
        "megatron.core.models.common.language_module.language_module:LanguageModule",
        "setup_embeddings_and_output_layer",
        _with_tensor_cuda_as_identity,
        "with tied embeddings and pipeline parallelism the last stage's copy of the embedding "
        "is synced by `weight.data = weight.data.cuda()` before an all-reduce.",
    ),
    Patch(
        "megatron.core.tensor_parallel.random",
        "torch",
        _cpu_torch,
        "model_parallel_cuda_manual_seed and CudaRNGStatesTracker.add seed and read the CUDA RNG; "
        "on CPU the tracker keeps CPU generator states (embedding dropout under sequence "
        "parallelism forks the tracker).",
    ),
    Patch(
        "megatron.core.optimizer.optimizer",
        "torch",
        _cpu_torch,
        "MixedPrecisionOptimizer.__init__ allocates found_inf / overflow buffers with device='cuda'.",
    ),
    Patch(
        "megatron.core.optimizer.clip_grads",
        "torch",
        _cpu_torch,
        "get_grad_norm_fp32 and clip_grad_by_total_norm_fp32 allocate buffers with device='cuda'.",
    ),
    Patch(
        "megatron.core.optimizer.clip_grads",
        "l2_norm_impl",
        _cpu_l2_norm,
        "get_grad_norm_fp32 calls megatron.core.utils.local_multi_tensor_l2_norm, which puts "
        "the norm on device='cuda'.",
    ),
    Patch(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        "__init__",
        _with_cuda_type_names,
        "DistributedOptimizer.__init__ (and _build_model_and_main_param_groups) pick fp32 main "
        "params by `param.type() in ['torch.cuda.HalfTensor', ...]` and raise on anything else.",
    ),
    Patch(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        "get_parameter_state_dp_zero",
        _with_tensor_cuda_as_identity,
        "saving the distributed optimizer in the reshardable format gathers its shards after "
        "`send_tensor.cuda()`.",
    ),
    Patch(
        "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params",
        "__init__",
        _with_cuda_type_names,
        "Float16OptimizerWithFloat16Params.__init__ sorts params by `param.type()` CUDA names.",
    ),
    Patch(
        "megatron.core.optimizer.optimizer",
        "clip_grad_by_total_norm_fp32",
        _with_cuda_type_names,
        "clip_grad_by_total_norm_fp32 asserts `param.grad.type() == 'torch.cuda.FloatTensor'`.",
    ),
    Patch(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "torch",
        _cpu_torch,
        "dist_checkpointing's file writer calls torch.cuda.synchronize() before copying tensors out.",
    ),
    Patch(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        "torch",
        _cpu_torch,
        "save_state_dict_async_finalize shares write failures in a tensor on device='cuda'.",
    ),
    Patch(
        "megatron.core.tensor_parallel.random",
        "_get_cuda_rng_state",
        lambda orig: lambda *args, **kwargs: torch.get_rng_state(),
        "CudaRNGStatesTracker.fork saves the current CUDA RNG state.",
    ),
    Patch(
        "megatron.core.tensor_parallel.random",
        "_set_cuda_rng_state",
        lambda orig: lambda state, *args, **kwargs: torch.set_rng_state(state),
        "CudaRNGStatesTracker.fork/add restore a CUDA RNG state.",
    ),
    Patch(
        "megatron.core.transformer.moe.token_dispatcher",
        "torch",
        _cpu_torch,
        "MoEAlltoAllTokenDispatcher.__init__ creates torch.cuda.Stream() for its device-to-host "
        "copies, and _maybe_dtoh_and_synchronize uses torch.cuda.current_stream/stream.",
    ),
    Patch(
        "megatron.core.transformer.moe.token_dispatcher",
        "maybe_move_tensor_to_cpu",
        _splits_as_numpy,
        "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize turns the all-to-all split "
        "sizes into numpy arrays only when they are CUDA tensors.",
    ),
    Patch(
        "megatron.core.transformer.moe.moe_utils",
        "torch",
        _cpu_torch,
        "track_moe_metrics(force_initialize=True) creates missing aux-loss tracker entries with "
        "torch.zeros(num_layers, device='cuda') (e.g. z_loss, or a pipeline stage without MoE).",
    ),
]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def enable_cpu_compat() -> list[Patch]:
    """Apply every patch once; return the list applied (empty when CUDA is present)."""
    if cuda_available():
        return []
    return apply_patches(PATCHES, _APPLIED)

"""RMSNorm that matches Hugging Face numerics and works under Megatron sequence parallelism."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

from megatune.layers.fused import rms_norm


class RMSNorm(torch.nn.Module):
    """Normalise in fp32, cast back, then scale: the order Llama/Qwen use in transformers.

    Under sequence parallelism each TP rank sees a different slice of the sequence, so the weight
    grads differ per rank; flagging the weight `sequence_parallel` makes Megatron's
    `finalize_model_grads` sum them over the TP group.

    With `config.persist_layer_norm` (Megatron's switch for its fused norm kernel) the same
    formula runs as one compiled kernel per direction on CUDA (layers/fused.py); on CPU it
    stays eager.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_init_device(config))
        )
        self.weight.sequence_parallel = config.sequence_parallel
        self.fused = bool(config.persist_layer_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _init_device(config: TransformerConfig) -> torch.device:
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())

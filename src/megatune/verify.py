"""`megatune verify`: Megatron logits vs Hugging Face logits on the same weights and tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatune.data.collator import Batch
from megatune.distributed import device
from megatune.models.build import ModelBundle
from megatune.models.weights import export_hf, load_hf_weights

# Default bounds on max |logit difference|; bf16 keeps 8 bits of mantissa, so two correct
# implementations that round in different places differ visibly (see docs/verify.md).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05}


@dataclass
class VerifyResult:
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"max_abs_diff={self.max_abs_diff:.6g} mean_abs_diff={self.mean_abs_diff:.6g} "
            f"tolerance={self.tolerance:g} {verdict}"
        )


def megatron_logits(bundle: ModelBundle, batch_inputs: Batch) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, v] on the last pipeline stage, None elsewhere: the HF
    vocabulary's v columns, without the rows padded for tensor parallelism (-inf there)."""
    batch, seq_len = batch_inputs.tokens.shape
    captured: list[torch.Tensor] = []

    def loss_func(output: torch.Tensor):
        full = tensor_parallel.gather_from_tensor_model_parallel_region(output)
        captured.append(full[..., : bundle.vocab_size].float())
        return output.sum() * 0.0, {}

    def forward_step(data_iterator, model):
        return bundle.provider.forward(model, batch_inputs, device(), labels=None), loss_func

    for chunk in bundle.chunks:
        chunk.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([None]) for _ in bundle.chunks] if len(bundle.chunks) > 1 else iter([None]),
            model=bundle.chunks if len(bundle.chunks) > 1 else bundle.chunks[0],
            num_microbatches=1,
            seq_length=seq_len,
            micro_batch_size=batch,
            forward_only=True,
        )
    return captured[0] if captured else None


def hf_logits(model_dir: str, inputs: dict, auto_class: str, dtype: torch.dtype) -> torch.Tensor:
    """transformers' logits [b, s, v] for the same inputs."""
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=dtype).to(device()).eval()
    with torch.no_grad():
        out = model(**{k: v.to(device()) for k, v in inputs.items()}).logits.float()
    del model
    return out


def run_verify(
    bundle: ModelBundle,
    model_dir: str,
    dtype: torch.dtype,
    tolerance: float | None,
    batch: int = 2,
    seq_len: int = 32,
    seed: int = 1234,
    export_path: str | None = None,
) -> VerifyResult:
    """Load, compare, optionally export; every rank gets the same result back."""
    load_hf_weights(bundle, model_dir)
    if export_path:
        export_hf(bundle, model_dir, export_path, dtype)
    batch_inputs, hf_inputs, auto_class = bundle.provider.verify_inputs(model_dir, bundle.hf, batch, seq_len, seed)
    ours = megatron_logits(bundle, batch_inputs)
    stats = torch.zeros(2, dtype=torch.float64)
    reporter = ours is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    if reporter:
        ref = hf_logits(model_dir, hf_inputs, auto_class, dtype)
        diff = (ours - ref).abs()
        stats = torch.tensor([diff.max().item(), diff.mean().item()], dtype=torch.float64)
    # The last stage's first rank measured; share it so every rank exits the same way.
    stats = stats.to(device())
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    bound = TOLERANCE[dtype] if tolerance is None else tolerance
    return VerifyResult(float(stats[0]), float(stats[1]), bound)

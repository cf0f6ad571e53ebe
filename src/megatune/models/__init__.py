"""The bridge between Hugging Face checkpoints and Megatron-core models: one provider per family.

To add a family: write `models/<model_type>.py` declaring a `PROVIDER` (a `DecoderProvider`, or
a subclass of `provider.ModelProvider` for another kind of model) and add it to `PROVIDERS`.
"""

from __future__ import annotations

from megatune.models import llama, mixtral, qwen2, qwen2_moe, qwen2_vl, qwen3, qwen3_moe
from megatune.models.provider import ModelProvider, UnsupportedModelError

PROVIDERS: dict[str, ModelProvider] = {p.model_type: p for p in (
    llama.PROVIDER, mixtral.PROVIDER, qwen2.PROVIDER, qwen2_moe.PROVIDER, qwen3.PROVIDER, qwen3_moe.PROVIDER,
    qwen2_vl.QWEN2_VL, qwen2_vl.QWEN2_5_VL,
)}


def get_provider(hf: dict, where: str = "config.json") -> ModelProvider:
    """The provider of `hf["model_type"]`; UnsupportedModelError (naming `where`) for an
    unknown type or an unsupported variant of a known one."""
    model_type = hf.get("model_type")
    if model_type not in PROVIDERS:
        raise UnsupportedModelError(
            f"{where}: model_type '{model_type}' is not supported; supported: {', '.join(sorted(PROVIDERS))}"
        )
    provider = PROVIDERS[model_type]
    problems = provider.problems(hf)
    if problems:
        raise UnsupportedModelError("; ".join(f"{where}: {p}" for p in problems))
    return provider


def accepts_images(model_dir: str) -> bool:
    """Whether the model in `model_dir` has a vision tower (image rows are encoded for it)."""
    from megatune.config import read_hf_config

    hf = read_hf_config(model_dir)
    return get_provider(hf, f"{model_dir}/config.json").accepts_images

"""The bridge between Hugging Face checkpoints and Megatron-core models: one provider per family.

To add a family: write `models/<model_type>.py` declaring a `PROVIDER` (a `DecoderProvider`, or
a subclass of `provider.ModelProvider` for another kind of model) and add it to `PROVIDERS`.
"""

from __future__ import annotations

from megatune.models import llama, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
from megatune.models.provider import ModelProvider, UnsupportedModelError

PROVIDERS: dict[str, ModelProvider] = {p.model_type: p for p in (
    llama.PROVIDER, mixtral.PROVIDER, qwen2.PROVIDER, qwen2_moe.PROVIDER, qwen3.PROVIDER, qwen3_moe.PROVIDER
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

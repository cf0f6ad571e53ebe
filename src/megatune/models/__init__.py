"""The bridge between Hugging Face checkpoints and Megatron-core models, one module per family."""

from __future__ import annotations

from megatune.models import llama, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
from megatune.models.family import Family, UnsupportedModelError

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    llama.FAMILY, mixtral.FAMILY, qwen2.FAMILY, qwen2_moe.FAMILY, qwen3.FAMILY, qwen3_moe.FAMILY
)}


def get_family(hf: dict, where: str = "config.json") -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{where}: model_type '{model_type}' is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[model_type]
    problems = family.problems(hf)
    if problems:
        raise UnsupportedModelError("; ".join(f"{where}: {p}" for p in problems))
    return family

"""What the mixture-of-experts families share: the config translation and the expert mappings.

Routing in HF (Qwen2-MoE, Qwen3-MoE, Mixtral): softmax over all experts (fp32), top-k, then
renormalise the k probabilities (always in Mixtral, when `norm_topk_prob` in the Qwens).
Megatron's default order (top-k on the logits, softmax over those k) gives the renormalised
probabilities exactly; without renormalisation it must softmax first (`moe_router_pre_softmax`).
"""

from __future__ import annotations

from megatune.models.mappings import FusedGateUp, Mapping, Replicated, RowParallel, StackedDown, StackedGateUp

_EXPERT = "decoder.layers.{layer}.mlp.experts.local_experts.{expert}"
_GROUPED = "decoder.layers.{layer}.mlp.experts"
_SHARED = "decoder.layers.{layer}.mlp.shared_experts"


def num_experts(hf: dict) -> int:
    # transformers 5 names it num_experts in every family's config dict; older files say
    # num_local_experts (Mixtral, on disk to this day)
    return hf.get("num_experts") or hf["num_local_experts"]


def moe_layer_freq(hf: dict) -> list[int]:
    """Qwen MoEs: layer i is sparse unless listed in mlp_only_layers, and only every
    decoder_sparse_step-th (1-based). Without those fields every layer is sparse (Mixtral)."""
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(hf["num_hidden_layers"])]


def active_expert_params(hf: dict) -> int:
    """Matmul parameters of one sparse MLP that a token uses: the router, its top-k experts and
    (Qwen2-MoE) the always-on shared expert with its sigmoid gate. Mixtral's experts are
    `intermediate_size` wide; the Qwens' `moe_intermediate_size`."""
    h = hf["hidden_size"]
    expert_ffn = hf.get("moe_intermediate_size") or hf["intermediate_size"]
    params = h * num_experts(hf) + hf["num_experts_per_tok"] * 3 * h * expert_ffn
    shared_ffn = hf.get("shared_expert_intermediate_size") or 0
    if shared_ffn:
        params += 3 * h * shared_ffn + h
    return params


def aux_loss_coeff(hf: dict, config) -> float:
    """The YAML's `moe_aux_loss_coeff`, else the HF config's `router_aux_loss_coef`, unchanged."""
    coeff = config.parallel.moe_aux_loss_coeff
    return hf.get("router_aux_loss_coef", 0.0) if coeff is None else coeff


def aux_loss_description(hf: dict, config) -> str:
    """Start-up line on the balancing pressure: Megatron sums a per-layer loss that is 1 at
    perfect balance, while transformers pools all layers' router outputs into one loss that is k
    there, so one coefficient means about L/k times more pressure here (said, never silent)."""
    coeff, layers, k = aux_loss_coeff(hf, config), sum(moe_layer_freq(hf)), hf["num_experts_per_tok"]
    source = "moe_aux_loss_coeff" if config.parallel.moe_aux_loss_coeff is not None else "router_aux_loss_coef in config.json"
    if not coeff:
        return f"no load-balancing loss (coefficient 0 from {source})"
    return (
        f"load-balancing loss x {coeff:g} (from {source}) per MoE layer, summed over {layers} layers. "
        f"transformers pools the layers into one loss that is {k}x larger at balance, so per forward pass the "
        f"same coefficient pushes {k}/{layers} = {k / layers:.2g}x as hard there (moe_aux_loss_coeff: "
        f"{coeff * k / layers:.3g} matches that; its Trainer also sums the term over micro-batches and ranks "
        "where megatune averages; docs/train.md, MoE)"
    )


def moe_kwargs(
    hf: dict,
    config,
    *,
    expert_ffn: int,
    renormalise: bool,
    shared_expert_ffn: int | None = None,
    shared_expert_gate: bool = False,
) -> dict:
    """Megatron TransformerConfig MoE kwargs; `config` is the run config (YAML overrides)."""
    out = dict(
        num_moe_experts=num_experts(hf),
        moe_router_topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=expert_ffn,
        moe_layer_freq=moe_layer_freq(hf),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not renormalise,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=aux_loss_coeff(hf, config),
        moe_router_dtype="fp32",
        moe_grouped_gemm=config.parallel.moe_grouped_gemm,  # GroupedExperts or SequentialMLP; layers/spec.py
        moe_permute_fusion=False,
    )
    if shared_expert_ffn:
        out.update(moe_shared_expert_intermediate_size=shared_expert_ffn, moe_shared_expert_gate=shared_expert_gate)
    return out


def expert_mappings(router: str, hf_expert: str, gate: str, up: str, down: str) -> tuple[Mapping, ...]:
    """Router and routed experts. `hf_expert` is the HF prefix of expert `{expert}` of layer
    `{layer}`; gate/up/down the names of its three weights under it."""
    g, u, d = (f"{hf_expert}.{n}.weight" for n in (gate, up, down))
    return (
        Replicated("decoder.layers.{layer}.mlp.router.weight", router),
        # Megatron SequentialMLP (moe_grouped_gemm: false): one MLP per local expert
        FusedGateUp(f"{_EXPERT}.linear_fc1.weight", g, u),
        RowParallel(f"{_EXPERT}.linear_fc2.weight", d),
        # megatune GroupedExperts (moe_grouped_gemm: true): all local experts in one tensor
        StackedGateUp(f"{_GROUPED}.weight1", g, u),
        StackedDown(f"{_GROUPED}.weight2", d),
    )


# Qwen2-MoE and Qwen3-MoE name their router and experts alike.
QWEN_EXPERT_MAPPINGS = expert_mappings(
    "model.layers.{layer}.mlp.gate.weight", "model.layers.{layer}.mlp.experts.{expert}", "gate_proj", "up_proj", "down_proj"
)


def shared_expert_mappings(hf_shared: str, hf_gate: str | None) -> tuple[Mapping, ...]:
    """Megatron SharedExpertMLP (tensor-parallel like a dense MLP; `gate_weight` [1, hidden],
    output scaled by sigmoid(x @ gate_weight^T), as HF's shared_expert_gate)."""
    out: tuple[Mapping, ...] = (
        FusedGateUp(f"{_SHARED}.linear_fc1.weight", f"{hf_shared}.gate_proj.weight", f"{hf_shared}.up_proj.weight"),
        RowParallel(f"{_SHARED}.linear_fc2.weight", f"{hf_shared}.down_proj.weight"),
    )
    if hf_gate:
        out += (Replicated(f"{_SHARED}.gate_weight", hf_gate),)
    return out

"""Preference losses (DPO and relatives) from per-sequence log-probabilities.

Pure torch, no model or parallel state: the `dpo` stage gathers, for each pair of a micro-batch,
the policy's summed log-probability of the chosen and of the rejected response, their response
token counts and (for losses with a reference model) the reference model's summed log-probabilities
of the same tokens; `preference_loss` turns them into one loss per pair plus the metrics LLaMA-Factory
logs. Keys and meanings are LLaMA-Factory's (`pref_beta`, `pref_loss`, `pref_ftx`,
`dpo_label_smoothing`, `simpo_gamma`, `ref_model`).

Which log-probability a loss sees (as in LLaMA-Factory's DPO trainer): `sigmoid` and `hinge` use the
sum over the response tokens; `ipo`, `orpo` and `simpo` use the mean (sum / token count), for the
policy and the reference alike. The SFT term of `pref_ftx` (and ORPO's own SFT term) is always the
mean negative log-likelihood of the chosen response.

With the policy's log-ratio h = (pc - pr) - (rc - rr) of a pair (p: policy, r: reference,
c: chosen, r: rejected) and beta = `pref_beta`:

- sigmoid (DPO, Rafailov et al. 2023, eq. 7; cDPO label smoothing eps, Mitchell 2023):
  -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
- hinge (SLiC, Zhao et al. 2023, as TRL writes it): max(0, 1 - beta * h)
- ipo (Azar et al. 2023, eq. 17): (h - 1 / (2 * beta))^2
- orpo (Hong et al. 2024, no reference): -pc + beta * -log sigmoid(log odds(pc) - log odds(pr)),
  with odds(p) = exp(p) / (1 - exp(p)) of the mean log-probability p
- simpo (Meng et al. 2024, no reference): -log sigmoid(beta * (pc - pr) - simpo_gamma)

Distributed means: the module returns per-pair losses and, per metric, a *sum* over this
micro-batch's pairs. The stage sums these over micro-batches and data-parallel ranks and divides
by the number of pairs in the global batch, which gives the global-batch mean of every metric
(LLaMA-Factory averages per-device means; the two agree when every micro-batch holds the same
number of pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PREF_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
REFERENCE_FREE_LOSSES = ("orpo", "simpo")  # LLaMA-Factory builds no reference model for these
MEAN_LOGPS_LOSSES = ("ipo", "orpo", "simpo")  # the others use summed log-probabilities

# Metric names as LLaMA-Factory logs them; `sft_loss` and `odds_ratio_loss` only when they apply.
METRIC_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True)
class PreferenceConfig:
    """The `stage: dpo` keys, with LLaMA-Factory's defaults.

    pref_beta: beta of every loss (the inverse temperature of the implicit reward).
    pref_loss: one of PREF_LOSSES.
    pref_ftx: coefficient of an extra SFT loss (mean NLL of the chosen response) added per pair.
    dpo_label_smoothing: cDPO's eps, the assumed probability that a pair's labels are flipped;
        sigmoid only.
    simpo_gamma: SimPO's target reward margin.
    ref_model: path of a different reference checkpoint; None means the initial policy. Unused by
        orpo and simpo, which need no reference model.
    """

    pref_beta: float = 0.1
    pref_loss: str = "sigmoid"
    pref_ftx: float = 0.0
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    ref_model: str | None = None

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs reference log-probabilities (LLaMA-Factory's `use_ref_model`)."""
        return self.pref_loss not in REFERENCE_FREE_LOSSES

    @property
    def uses_mean_logps(self) -> bool:
        """Whether the loss sees mean (True) or summed (False) response log-probabilities."""
        return self.pref_loss in MEAN_LOGPS_LOSSES

    @property
    def logs_sft_loss(self) -> bool:
        """`sft_loss` is a metric when an SFT term is part of the loss: pref_ftx > 0, or orpo."""
        return self.pref_ftx > 0 or self.pref_loss == "orpo"

    def metric_keys(self) -> tuple[str, ...]:
        """The metric names `preference_loss` returns for this configuration, in a fixed order
        (the order to stack them in for one all-reduce)."""
        keys = METRIC_KEYS
        if self.logs_sft_loss:
            keys += ("sft_loss",)
        if self.pref_loss == "orpo":
            keys += ("odds_ratio_loss",)
        return keys


def validate_preference_config(config: PreferenceConfig) -> list[str]:
    """Check the keys; returns notes to log (settings that are accepted but have no effect).

    Raises ValueError, one line per problem, naming the key, its value and the fix:
    - pref_loss not one of PREF_LOSSES;
    - pref_beta not > 0 (every loss divides by it or scales by it: ipo's target 1/(2 beta));
    - dpo_label_smoothing outside [0, 0.5) (at 0.5 the smoothed loss has no gradient), or set
      with a loss other than sigmoid (LLaMA-Factory refuses: it is only valid for sigmoid);
    - pref_ftx < 0; simpo_gamma < 0.
    """
    c = config
    problems: list[str] = []
    notes: list[str] = []
    if c.pref_loss not in PREF_LOSSES:
        extra = " (LLaMA-Factory's kto_pair is not supported)" if c.pref_loss == "kto_pair" else ""
        problems.append(f"pref_loss: {c.pref_loss!r} is not one of {', '.join(PREF_LOSSES)}{extra}")
    if not c.pref_beta > 0:
        problems.append(f"pref_beta: {c.pref_beta} must be > 0 (LLaMA-Factory's default is 0.1)")
    if not 0 <= c.dpo_label_smoothing < 0.5:
        problems.append(
            f"dpo_label_smoothing: {c.dpo_label_smoothing} must be in [0, 0.5): it is the assumed "
            "probability that a pair's preference is flipped (0 = plain DPO)"
        )
    if c.dpo_label_smoothing > 0 and c.pref_loss != "sigmoid":
        problems.append(
            f"dpo_label_smoothing: only valid for pref_loss sigmoid, not {c.pref_loss!r} (as in "
            "LLaMA-Factory); set it to 0 or use pref_loss: sigmoid"
        )
    if not c.pref_ftx >= 0:
        problems.append(f"pref_ftx: {c.pref_ftx} must be >= 0 (the weight of the SFT loss on the chosen response)")
    if not c.simpo_gamma >= 0:
        problems.append(f"simpo_gamma: {c.simpo_gamma} must be >= 0 (SimPO's target reward margin)")
    if problems:
        raise ValueError("\n".join(problems))
    if c.ref_model is not None and not c.uses_reference:
        notes.append(f"ref_model {c.ref_model!r} is not used: pref_loss {c.pref_loss} needs no reference model")
    if c.simpo_gamma != 0.5 and c.pref_loss != "simpo":
        notes.append(f"simpo_gamma {c.simpo_gamma} has no effect with pref_loss {c.pref_loss}")
    return notes


@dataclass
class PreferenceOutput:
    """What `preference_loss` returns for the P pairs of a micro-batch.

    losses: [P] (float32, or float64 for float64 inputs), the loss of each pair (preference loss plus pref_ftx * sft term), with
        autograd history back to the policy log-probabilities. The stage's loss for backward is
        losses.sum() / (pairs in the global batch).
    metric_sums: metric name -> 0-d tensor, the sum over the P pairs (detached). Divide the
        global sum by the global number of pairs for LLaMA-Factory's metric (a mean over pairs).
    num_pairs: P.
    """

    losses: torch.Tensor
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    num_pairs: int = 0


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    config: PreferenceConfig,
) -> PreferenceOutput:
    """Per-pair preference loss and metric sums (see the module docstring for the formulas).

    Args (all [P], pair i's chosen and rejected at index i):
        policy_chosen_logps, policy_rejected_logps: the policy's log-probabilities (natural log,
            nats) of the response tokens, SUMMED over the tokens of each response.
        chosen_tokens, rejected_tokens: the number of response tokens summed over (> 0).
        reference_chosen_logps, reference_rejected_logps: the same sums under the reference
            model (no gradient needed); required for sigmoid/hinge/ipo, must be None for
            orpo/simpo.
        config: the validated keys.

    Returns a PreferenceOutput. Rewards (LLaMA-Factory's definition): beta * (policy - reference)
    log-probabilities with a reference, beta * policy log-probabilities for orpo/simpo, each the sum
    or mean as the loss uses them; `rewards/accuracies` counts pairs whose chosen reward is strictly
    larger; `logps/*` are the policy log-probabilities as the loss uses them (sum or mean).

    Raises ValueError for mismatched shapes, a token count <= 0, or reference log-probabilities
    missing for a loss that needs them (or given to one that does not).
    """
    c = config
    pc, pr = _at_least_fp32(policy_chosen_logps), _at_least_fp32(policy_rejected_logps)
    nc, nr = chosen_tokens.to(pc.device, pc.dtype), rejected_tokens.to(pc.device, pc.dtype)
    tensors = {"policy_chosen_logps": pc, "policy_rejected_logps": pr, "chosen_tokens": nc, "rejected_tokens": nr}
    if c.uses_reference:
        if reference_chosen_logps is None or reference_rejected_logps is None:
            raise ValueError(f"pref_loss {c.pref_loss} needs reference log-probabilities of chosen and rejected")
        rc, rr = _at_least_fp32(reference_chosen_logps.detach()), _at_least_fp32(reference_rejected_logps.detach())
        tensors.update(reference_chosen_logps=rc, reference_rejected_logps=rr)
    elif reference_chosen_logps is not None or reference_rejected_logps is not None:
        raise ValueError(f"pref_loss {c.pref_loss} is reference-free: pass no reference log-probabilities")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or pc.dim() != 1:
        raise ValueError(f"preference_loss expects 1-D tensors of one length [pairs], got {shapes}")
    if bool((nc <= 0).any()) or bool((nr <= 0).any()):
        raise ValueError("every chosen and rejected response needs at least one token (a token count is <= 0)")

    if c.uses_mean_logps:  # LLaMA-Factory divides policy and reference sums by the same counts
        pc, pr = pc / nc, pr / nr
        if c.uses_reference:
            rc, rr = rc / nc, rr / nr
    beta = c.pref_beta
    sft = -_at_least_fp32(policy_chosen_logps) / nc  # mean NLL of the chosen response, [P]
    extra: dict[str, torch.Tensor] = {}

    if c.uses_reference:
        h = (pc - pr) - (rc - rr)
        if c.pref_loss == "sigmoid":
            eps = c.dpo_label_smoothing
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif c.pref_loss == "hinge":
            losses = torch.relu(1 - beta * h)
        else:  # ipo
            losses = (h - 1 / (2 * beta)) ** 2
        chosen_rewards = beta * (pc - rc).detach()
        rejected_rewards = beta * (pr - rr).detach()
    else:
        if c.pref_loss == "orpo":
            # log odds(p) = p - log(1 - exp(p)); expm1 keeps log(1 - exp(p)) accurate near p = 0
            log_odds = (pc - pr) - (torch.log(-torch.expm1(pc)) - torch.log(-torch.expm1(pr)))
            odds_ratio = -F.logsigmoid(log_odds)
            losses = sft + beta * odds_ratio
            extra["odds_ratio_loss"] = odds_ratio
        else:  # simpo
            losses = -F.logsigmoid(beta * (pc - pr) - c.simpo_gamma)
        chosen_rewards = beta * pc.detach()
        rejected_rewards = beta * pr.detach()

    if c.pref_ftx > 0:
        losses = losses + c.pref_ftx * sft

    per_pair = {
        "loss": losses.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
    }
    if c.logs_sft_loss:
        per_pair["sft_loss"] = sft.detach()
    per_pair.update({k: v.detach() for k, v in extra.items()})
    sums = {key: per_pair[key].sum() for key in c.metric_keys()}
    return PreferenceOutput(losses=losses, metric_sums=sums, num_pairs=int(pc.shape[0]))


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 log-probabilities are upcast (LLaMA-Factory computes in float32); float64 stays
    # float64 so the formulas can be checked to high precision.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def metric_means(metric_sums: dict[str, torch.Tensor | float], num_pairs: int) -> dict[str, float]:
    """Global means from summed metrics: each sum (already reduced over micro-batches and ranks)
    divided by the number of pairs in the global batch. Raises ValueError if num_pairs < 1."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    return {key: float(value) / num_pairs for key, value in metric_sums.items()}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each sequence's labelled tokens, and their count.

    logits: [N, S, V] from a causal LM (position t predicts token t + 1); labels: [N, S] aligned
    with the inputs, Hugging Face style (labels[:, t] is token t or `ignore_index`); the shift to
    next-token targets happens here, as in LLaMA-Factory's get_batch_logps. Computed in float32 (or float64).
    Returns (sums [N] in nats, counts [N] int64). Raises ValueError on mismatched shapes.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must agree on [N, S]")
    targets = labels[:, 1:]
    mask = targets != ignore_index
    logprobs = torch.log_softmax(_at_least_fp32(logits[:, :-1]), dim=-1)
    picked = torch.gather(logprobs, 2, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a per-sequence tensor [2P, ...] laid out as LLaMA-Factory's
    pairwise collator does: the P chosen sequences first, then the P rejected ones in the same
    pair order. Raises ValueError for an odd first dimension."""
    if values.shape[0] % 2:
        raise ValueError(f"a pairwise micro-batch holds 2 * pairs sequences, got {values.shape[0]}")
    half = values.shape[0] // 2
    return values[:half], values[half:]

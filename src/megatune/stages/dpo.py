"""`stage: dpo`: preference optimisation on (prompt, chosen, rejected) pairs.

Data: LLaMA-Factory's pairwise rows (`ranking: true`; data/pairwise.py) encoded into a chosen and
a rejected sample that share the prompt, truncated by LLaMA-Factory's pairwise rule. A pair is
one sample for batching, so chosen and rejected always land in the same micro-batch and on the
same data-parallel rank; a micro-batch of P pairs is collated as 2P rows, the P chosen first.

Loss (stages/preference_loss.py): per pair, from the policy's (and the reference model's)
log-probabilities of each response, summed over its tokens; normalised by the number of pairs of
the global batch (a pair is this stage's loss unit, see stages/base.py).

Reference model: a second copy of the model in the policy's parallel layout, built from
`ref_model` (or the initial policy, i.e. `model_name_or_path`), held in the training dtype with
no gradients and no optimizer state. Before each schedule run a forward-only pass of Megatron's
schedule over the same micro-batches computes the reference log-probabilities, which the last
pipeline stage attaches to each micro-batch. It is reloaded from its HF folder on resume, so
checkpoints do not hold it. Memory: one more copy of the weights (2 bytes/param in bf16), against
the policy's ~16 bytes/param (bf16 weights, fp32 grads, fp32 master weights and Adam moments);
compute: one more forward pass (~1/3 of a training step's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatune.data.collator import Batch, collate
from megatune.data.processors import IGNORE, Sample
from megatune.data.registry import DataError
from megatune.stages.base import Stage, forward_with_labels
from megatune.stages.preference_loss import PreferenceConfig, preference_loss, split_pairs


@dataclass
class PairSample:
    """One preference pair: the chosen and the rejected sample (same prompt)."""

    chosen: Sample
    rejected: Sample

    @property
    def doc_lens(self) -> list[int]:
        return self.chosen.doc_lens + self.rejected.doc_lens

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def num_tokens(self) -> int:
        return self.chosen.num_tokens + self.rejected.num_tokens

    @property
    def num_loss_tokens(self) -> int:
        return self.chosen.num_loss_tokens + self.rejected.num_loss_tokens


def preference_config(config) -> PreferenceConfig:
    t = config.training
    return PreferenceConfig(
        pref_beta=t.pref_beta, pref_loss=t.pref_loss, pref_ftx=t.pref_ftx,
        dpo_label_smoothing=t.dpo_label_smoothing, simpo_gamma=t.simpo_gamma, ref_model=t.ref_model,
    )


class DPOStage(Stage):
    name = "dpo"
    columns = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "truncated")
    empty_row = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": [],
                 "truncated": False}
    packable = False

    def __init__(self, pref: PreferenceConfig | None = None):
        self.pref = pref or PreferenceConfig()
        self.sum_names = ("loss_sum", "pairs", *[k for k in self.pref.metric_keys() if k != "loss"])
        self.reference: list | None = None  # reference model chunks, once attached

    @classmethod
    def from_config(cls, config) -> "DPOStage":
        return cls(preference_config(config))

    # -- data -------------------------------------------------------------------------------

    def prepare_tokenizer(self, config, tokenizer) -> str | None:
        from megatune.stages.supervised import SupervisedStage

        return SupervisedStage().prepare_tokenizer(config, tokenizer)  # the same chat-template eos

    def encode(self, row, spec, source, template, tokenizer, data_config) -> dict:
        from megatune.data.pairwise import encode_pair, pair_samples, to_preference_pair

        pair = to_preference_pair(row, spec, source)
        chosen, rejected = pair_samples(
            encode_pair(template, tokenizer, pair, data_config.enable_thinking), data_config.cutoff_len, source
        )
        return {
            "chosen_input_ids": chosen.input_ids, "chosen_labels": chosen.labels,
            "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels,
            "truncated": chosen.truncated,
        }

    def required_columns(self, spec) -> list[str]:
        return ["prompt" if spec.formatting == "alpaca" else "messages", "chosen", "rejected"]

    def to_sample(self, encoded: dict) -> PairSample:
        truncated = bool(encoded["truncated"])
        return PairSample(
            Sample(list(encoded["chosen_input_ids"]), list(encoded["chosen_labels"]), truncated=truncated),
            Sample(list(encoded["rejected_input_ids"]), list(encoded["rejected_labels"]), truncated=truncated),
        )

    # -- model ------------------------------------------------------------------------------

    def collate(self, samples: list, pad_id: int, pad_multiple: int, packed: bool) -> Batch:
        if packed:
            raise DataError("stage dpo does not pack samples: set packing: false")
        return collate([p.chosen for p in samples] + [p.rejected for p in samples], pad_id, pad_multiple)

    def sequence_length(self, samples: list, packed: bool) -> int:
        return max(max(p.chosen.num_tokens, p.rejected.num_tokens) for p in samples)

    def loss_units(self, batch: Batch) -> int:
        return _pairs_with_labels(batch)

    def attach(self, config, bundle) -> None:
        """Build the reference model in the policy's layout (not for orpo/simpo)."""
        if not self.pref.uses_reference:
            return
        from megatune.models.build import build_model
        from megatune.models.weights import load_hf_weights

        ref_dir = self.pref.ref_model or config.model.model_name_or_path
        reference = build_model(config, ref_dir)
        mismatch = reference_mismatch(bundle.hf, reference.hf)
        if mismatch:
            raise DataError(f"ref_model {ref_dir} cannot serve as the reference of {config.model.model_name_or_path}: {mismatch}")
        load_hf_weights(reference, ref_dir)
        for chunk in reference.chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        self.reference = reference

    def prepare(self, provider, batches: list[Batch]) -> None:
        """Reference log-probabilities of every micro-batch: a forward-only schedule over the
        reference chunks; the last pipeline stage attaches them as extras["reference_logps"] [2P]."""
        if self.reference is None:
            return
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = self.reference.chunks
        collected: list[torch.Tensor] = []

        def forward_step(data_iterator, model):
            output, mask = forward_with_labels(provider, model, next(data_iterator))

            def loss_func(losses):
                collected.append(-(losses.float() * mask).sum(-1))
                return losses.sum() * 0.0, {}

            return output, loss_func

        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(batches),
                seq_length=max(b.tokens.shape[1] for b in batches),
                micro_batch_size=batches[0].tokens.shape[0],
                forward_only=True,
            )
        for batch, logps in zip(batches, collected):  # empty unless this is the last stage
            batch.extras["reference_logps"] = logps
        if self.reference.config.num_moe_experts:  # the reference's routers must not count as the policy's
            from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

            clear_aux_losses_tracker()

    def forward_step(self, provider) -> Callable:
        def forward_step(data_iterator, model):
            batch: Batch = next(data_iterator)
            output, mask = forward_with_labels(provider, model, batch)
            return output, lambda losses: self.pair_loss_sums(losses, mask, batch.extras.get("reference_logps"))

        return forward_step

    def pair_loss_sums(self, losses: torch.Tensor, mask: torch.Tensor, reference_logps: torch.Tensor | None):
        """Megatron loss-function result for per-token cross-entropy [2P, s] of a pairwise
        micro-batch: (sum of the pair losses, pairs, {"sums": [loss sum, pairs, metric sums...]})."""
        logps = -(losses.float() * mask).sum(-1)  # [2P] summed log-probabilities of each response
        counts = mask.sum(-1)
        if not bool(counts.all()):  # a masked-out micro-batch (an evaluation rank without samples)
            zero = logps.sum() * 0.0
            return zero, torch.tensor(0, dtype=torch.int), {"sums": torch.zeros(len(self.sum_names), device=logps.device)}
        pc, pr = split_pairs(logps)
        nc, nr = split_pairs(counts)
        rc, rr = split_pairs(reference_logps) if self.pref.uses_reference else (None, None)
        out = preference_loss(pc, pr, nc, nr, rc, rr, config=self.pref)
        loss_sum = out.losses.sum()
        pairs = torch.tensor(out.num_pairs, dtype=torch.int)
        sums = [loss_sum.detach(), torch.tensor(float(out.num_pairs), device=logps.device)]
        sums += [out.metric_sums[name].to(logps.device) for name in self.sum_names[2:]]
        return loss_sum, pairs, {"sums": torch.stack([s.float() for s in sums])}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = sums["pairs"]
        if not pairs:
            return {"loss": float("nan"), "pairs": pairs}
        return {"loss": sums["loss_sum"] / pairs, "pairs": pairs,
                **{name: sums[name] / pairs for name in self.sum_names[2:]}}


def _pairs_with_labels(batch: Batch) -> int:
    rows = batch.labels.shape[0]
    return rows // 2 if bool((batch.labels != IGNORE).any(dim=1).all()) else 0


def reference_mismatch(policy: dict, reference: dict) -> str | None:
    """Why a reference checkpoint cannot score the policy's tokens (None when it can): the
    same model type, vocabulary and layer/head shape are needed for the same parallel layout."""
    for key in ("model_type", "vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        if policy.get(key) != reference.get(key):
            return f"{key} is {reference.get(key)!r} there and {policy.get(key)!r} in the policy"
    return None

"""Workarounds for Megatron-core (0.16) defects that bite without Apex / Transformer Engine,
on GPU and CPU alike. Each names the Megatron call that fails and has a test.
"""

from __future__ import annotations

import contextlib

from megatune.compat.patching import Patch, apply_patches

_APPLIED: list[Patch] = []


def _keep_adam_step(original):
    """DistributedOptimizer.load_state_dict puts torch Adam's `step` into each parameter's
    state and then copies the checkpoint's per-parameter tensors over *every* state key; the
    reshardable format has no per-parameter `step` (it travels in the param groups), so the
    copy raises KeyError('step'). Keep the step that load_state_dict just restored."""

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    return set_states


def _own_adam_steps(original):
    """Without Apex/TE, DistributedOptimizer.load_state_dict gives every parameter's state the
    *same* `step` tensor; torch's Adam then increments that one tensor once per parameter per
    step, so bias correction is wrong after a resume (the losses drift from the second
    resumed step on). Give each parameter its own copy."""

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()
        return result

    return load_state_dict


def _define_te_general_gemm(moe_utils):
    """megatron.core.transformer.moe.moe_utils imports `te_general_gemm` only inside its
    `try: import transformer_engine` block and, unlike extensions/transformer_engine.py, never
    sets it to None in the `except ImportError` branch; RouterGatingLinearFunction.forward /
    backward then test `te_general_gemm is not None` and raise NameError. Define it as None
    (Megatron's own "no TE" value), which selects the torch.mm / torch.addmm path. The Patch
    targets the package's `moe_utils` attribute because apply_patches must read the original
    attribute, and `te_general_gemm` is exactly the one that is missing."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return moe_utils


class _AuxLossShare:
    """Loss units / non-padding tokens of the step in progress; only `moe_aux_loss_share` sets it."""

    value = 1.0


@contextlib.contextmanager
def moe_aux_loss_share(value: float):
    """Within this block (one training step), the MoE load-balancing loss scale that Megatron
    sets is multiplied by `value` (loss units / tokens of the step; see _aux_loss_token_mean)."""
    previous, _AuxLossShare.value = _AuxLossShare.value, value
    try:
        yield
    finally:
        _AuxLossShare.value = previous


def _aux_loss_token_mean(original):
    """With `calculate_per_token_loss`, the router multiplies each micro-batch's
    load-balancing loss by its token count and finalize_model_grads divides every gradient by
    the step's loss-token count, so the balancing pressure grows with the share of tokens that
    carry no loss (SFT prompts). Megatron's schedule sets this scale for every micro-batch;
    fold in loss tokens / tokens, which turns the result into the token mean it intends."""

    def set_loss_scale(scale):
        return original(scale * _AuxLossShare.value)

    return staticmethod(set_loss_scale)


def _in_process_results_queue(original):
    """Megatron's checkpoint writer (dist_checkpointing.strategies.filesystem_async) reports
    results through a `multiprocessing.Manager` queue, which starts a *spawned* server process
    that outlives a crashed trainer (and re-imports the launching script). megatune saves
    synchronously, so results never cross a process boundary: a plain in-process queue does the
    same job without the extra process."""
    import queue

    return original if original is not None else queue.Queue()


FIXES: list[Patch] = [
    Patch(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        "_set_main_param_and_optimizer_states",
        _keep_adam_step,
        "loading a distributed-optimizer checkpoint (fully_reshardable) with torch's Adam fails "
        "with KeyError('step') in _set_main_param_and_optimizer_states.",
    ),
    Patch(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        "load_state_dict",
        _own_adam_steps,
        "after a resume every parameter shares one Adam `step` tensor, which torch's Adam then "
        "advances once per parameter.",
    ),
    Patch(
        "megatron.core.transformer.moe",
        "moe_utils",
        _define_te_general_gemm,
        "without Transformer Engine every MoE router call fails: "
        "moe_utils.RouterGatingLinearFunction.forward reads the undefined te_general_gemm "
        "(NameError).",
    ),
    Patch(
        "megatron.core.transformer.moe.moe_utils:MoEAuxLossAutoScaler",
        "set_loss_scale",
        _aux_loss_token_mean,
        "with per-token loss, the MoE load-balancing gradient is multiplied by tokens / loss "
        "tokens (several times too strong for SFT).",
    ),
    Patch(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "_results_queue",
        _in_process_results_queue,
        "every checkpoint save starts a spawned multiprocessing.Manager server that outlives a "
        "crashed trainer.",
    ),
]


def enable_megatron_fixes() -> list[Patch]:
    # Make sure the package has the `moe_utils` attribute the te_general_gemm fix replaces.
    import megatron.core.transformer.moe.moe_utils  # noqa: F401

    return apply_patches(FIXES, _APPLIED)

"""Workarounds for Megatron-core (0.16) defects that bite without Apex / Transformer Engine,
on GPU and CPU alike. Each names the Megatron call that fails and has a test.
"""

from __future__ import annotations

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
]


def enable_megatron_fixes() -> list[Patch]:
    return apply_patches(FIXES, _APPLIED)

"""Training stages (LLaMA-Factory's `stage` key): what a dataset row becomes, how samples are
collated, and the loss handed to Megatron's schedule.

To add a stage: write `stages/<name>.py` with a `Stage` subclass and add it to `STAGES`; the
data pipeline, the trainer and `megatune data` then run it with no other change.
"""

from __future__ import annotations

from megatune.stages.base import Stage
from megatune.stages.dpo import DPOStage
from megatune.stages.pretrain import PretrainStage
from megatune.stages.supervised import SupervisedStage

STAGES: dict[str, type[Stage]] = {"pt": PretrainStage, "sft": SupervisedStage, "dpo": DPOStage}


def get_stage(config) -> Stage:
    """The stage object for the run's `stage` key, built from the run config (validation has
    already checked the name and the stage's keys)."""
    return STAGES[config.training.stage].from_config(config)

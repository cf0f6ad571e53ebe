"""The training engine on Megatron-core: forward/loss, schedules, optimizer, checkpoints."""

"""The training loop and what it stands on: megatron-core model, optimizer, schedule and checkpoints."""

"""The training loop on megatron-core: set-up, batches, steps, evaluation, checkpoints, signals."""

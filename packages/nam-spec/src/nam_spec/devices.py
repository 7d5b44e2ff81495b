"""Where new parameters go, following megatron's ``use_cpu_initialization``."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


def param_device(config: TransformerConfig) -> int | None:
    """None (the default device: CPU, or meta inside ``torch.device('meta')``) under CPU
    initialisation, else the current CUDA device, as megatron's own layers do."""
    return None if config.use_cpu_initialization else torch.cuda.current_device()

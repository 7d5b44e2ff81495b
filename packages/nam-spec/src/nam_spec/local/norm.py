"""RMSNorm that works under sequence parallelism.

megatron-core's torch norm asserts ``not config.sequence_parallel``, and MoE with TP > 1 needs
sequence parallelism. Under SP each rank normalises its own slice of the sequence, so the weight's
gradient is partial: marking it ``sequence_parallel`` makes megatron's finalize_model_grads sum it
across the tensor-parallel group (as it does for TE's norms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from torch import nn

from nam_spec.devices import param_device


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension (torch's fused kernel)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        device = param_device(config)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=config.params_dtype))
        self.eps = eps
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

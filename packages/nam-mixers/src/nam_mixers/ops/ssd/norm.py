"""The gated group-wise RMSNorm that closes the Mamba-2 mixer, in plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_rmsnorm_torch(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, ngroups: int, eps: float
) -> torch.Tensor:
    """RMSNorm(y * silu(z)) over groups of d // ngroups channels, times weight; y, z [..., d].

    Normalising per group (not over all of d) keeps the result independent of how the heads, and
    with them the groups, are split across tensor-parallel ranks.
    """
    u = y * F.silu(z)
    u = u.unflatten(-1, (ngroups, -1))
    u = u * torch.rsqrt(u.pow(2).mean(dim=-1, keepdim=True) + eps)
    return u.flatten(-2) * weight

"""The Mamba-2 mixer core on the three paths: in_proj output [z, x, B, C, dt] -> gated, normed y.

All three take the same tensors and return the same thing, so one parameter set runs on any of
them. The core works on the heads it is handed (a tensor-parallel rank's local heads); the
projections around it belong to the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nam_mixers.ops.conv import causal_conv1d_silu, causal_conv1d_torch
from nam_mixers.ops.ssd.chunked import ssd_chunked
from nam_mixers.ops.ssd.norm import gated_rmsnorm_torch


@dataclass(frozen=True)
class SSDShape:
    """Sizes of one core: its (local) heads, their groups, state size, chunk length and norm eps."""

    nheads: int
    headdim: int
    ngroups: int
    d_state: int
    chunk_size: int
    norm_eps: float

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels through the causal conv: x, B and C."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        """Width of the in_proj output, laid out [z, x, B, C, dt]."""
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads


@dataclass(frozen=True)
class SSDWeights:
    """The core's parameters: conv [conv_dim, width] and bias, dt_bias, A_log and D per head,
    norm weight [d_inner]."""

    conv_weight: torch.Tensor
    conv_bias: torch.Tensor
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor
    norm_weight: torch.Tensor


Core = Callable[[torch.Tensor, SSDWeights, SSDShape, torch.Tensor | None], torch.Tensor]


def core_reference(
    zxbcdt: torch.Tensor, w: SSDWeights, s: SSDShape, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """Plain PyTorch, computed in at least float32 (float64 stays float64), cast back at the end."""
    dtype = zxbcdt.dtype
    ct = torch.promote_types(dtype, torch.float32)
    z, xbc, dt = torch.split(zxbcdt.to(ct), [s.d_inner, s.conv_dim, s.nheads], dim=-1)
    xbc = F.silu(causal_conv1d_torch(xbc, w.conv_weight.to(ct), w.conv_bias.to(ct), seq_idx))
    x, B, C = torch.split(xbc, [s.d_inner, s.ngroups * s.d_state, s.ngroups * s.d_state], dim=-1)
    y = ssd_chunked(
        x.unflatten(-1, (s.nheads, s.headdim)),
        F.softplus(dt + w.dt_bias.to(ct)),
        -torch.exp(w.A_log.to(ct)),
        B.unflatten(-1, (s.ngroups, s.d_state)),
        C.unflatten(-1, (s.ngroups, s.d_state)),
        s.chunk_size,
        D=w.D.to(ct),
        seq_idx=seq_idx,
    )
    return gated_rmsnorm_torch(y.flatten(-2), z, w.norm_weight.to(ct), s.ngroups, s.norm_eps).to(dtype)


def core_split(
    zxbcdt: torch.Tensor, w: SSDWeights, s: SSDShape, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """Conv (causal-conv1d's CUDA op where it imports and the tensors are on CUDA, else the torch
    one), then mamba-ssm's Triton chunked scan and its Triton gated RMSNorm.

    z, x, B, C and dt stay strided views of the in_proj output: both kernels take the strides, so
    nothing is copied on the way in (the conv reads the channels-last layout as it is, when the in_proj
    width is a multiple of 8 as at NAM56R's).
    """
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    z, xbc, dt = torch.split(zxbcdt, [s.d_inner, s.conv_dim, s.nheads], dim=-1)
    xbc = causal_conv1d_silu(xbc, w.conv_weight, w.conv_bias, seq_idx)
    x, B, C = torch.split(xbc, [s.d_inner, s.ngroups * s.d_state, s.ngroups * s.d_state], dim=-1)
    y = mamba_chunk_scan_combined(
        x.unflatten(-1, (s.nheads, s.headdim)),
        dt,
        -torch.exp(w.A_log.float()),
        B.unflatten(-1, (s.ngroups, s.d_state)),
        C.unflatten(-1, (s.ngroups, s.d_state)),
        chunk_size=s.chunk_size,
        D=w.D,
        dt_bias=w.dt_bias,
        dt_softplus=True,
        seq_idx=seq_idx,
    )
    return rmsnorm_fn(
        y.flatten(-2),
        w.norm_weight,
        None,
        z=z,
        eps=s.norm_eps,
        group_size=s.d_inner // s.ngroups,
        norm_before_gate=False,
    )


def core_fused(
    zxbcdt: torch.Tensor, w: SSDWeights, s: SSDShape, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """mamba-ssm's mamba_split_conv1d_scan_combined: conv, scan and norm in one autograd function
    that splits the in_proj output itself, writes the input gradient in place and recomputes the
    conv in backward instead of keeping it."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined

    # Batch-major memory: its backward flattens dz (a slice of the gradient it returns) with a
    # reshape that copies when batch and time do not merge, so the norm's dz lands in the copy and
    # the returned gradient keeps uninitialised memory (NaN losses from sequence-first callers at
    # batch > 1). A no-op for contiguous input, and at batch 1.
    return mamba_split_conv1d_scan_combined(
        zxbcdt.contiguous(),
        w.conv_weight,
        w.conv_bias,
        w.dt_bias,
        -torch.exp(w.A_log.float()),
        w.D,
        s.chunk_size,
        seq_idx=seq_idx,
        activation="silu",
        rmsnorm_weight=w.norm_weight,
        rmsnorm_eps=s.norm_eps,
        headdim=s.headdim,
        ngroups=s.ngroups,
        norm_before_gate=False,
    )


CORES: dict[str, Core] = {"reference": core_reference, "split": core_split, "fused": core_fused}

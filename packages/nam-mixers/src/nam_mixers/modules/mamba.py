"""The Mamba-2 SSD mixer (the M block): projections around a core that runs on its heads.

    u [b, l, hidden] --in_proj--> [z, x, B, C, dt]          (d_inner, d_inner, g*n, g*n, heads)
    x, B, C <- SiLU(causal depthwise conv, width 4)          (not across document starts)
    y = SSD(x, dt = softplus(dt + dt_bias), A = -exp(A_log), B, C) + D * x
    o = RMSNorm_groupwise(y * silu(z)) * weight  --out_proj--> [b, l, hidden]

The core holds conv, dt_bias, A_log, D and the norm weight and runs on one of three named paths
(ops/ssd): 'fused' (mamba-ssm + causal-conv1d CUDA), 'split' (conv, then mamba-ssm's Triton scan),
'reference' (plain PyTorch, CPU and float64). The parameters do not depend on the path, so a
state dict saved on one path loads and runs on any other. in_proj and out_proj are plain
nn.Linear modules that a tensor-parallel adapter can swap for column/row-parallel ones; the core
then holds the local heads only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nam_mixers.modules.ssm_common import (
    CorePath,
    KernelPath,
    check_positive_ints,
    check_seq_idx,
    dt_bias_init,
)
from nam_mixers.ops.conv import causal_conv1d_step, causal_conv1d_torch, conv_state
from nam_mixers.ops.ssd import CORES, SSDShape, SSDWeights, check_available, gated_rmsnorm_torch, resolve_path
from nam_mixers.ops.ssd.step import ssd_final_state, ssd_step


@dataclass(frozen=True)
class MambaState:
    """What one token of incremental decoding needs of the past: the conv's last inputs
    [b, width - 1, conv_dim] and the SSM state [b, nheads, headdim, d_state], both float32."""

    conv: torch.Tensor
    ssm: torch.Tensor


class MambaCore(KernelPath, nn.Module):
    """Everything between the projections: in_proj output [b, l, d_in_proj] -> [b, l, d_inner].

    `nheads` and `ngroups` are the heads and groups this module holds (the local ones under tensor
    parallelism); the group-wise norm makes the result independent of that split.
    """

    _check_available = staticmethod(check_available)
    _resolve_path = staticmethod(resolve_path)

    def __init__(
        self,
        nheads: int,
        headdim: int = 64,
        d_state: int = 64,
        ngroups: int = 1,
        conv_width: int = 4,
        chunk_size: int = 128,
        norm_eps: float = 1e-5,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(
            "MambaCore",
            nheads=nheads,
            headdim=headdim,
            d_state=d_state,
            ngroups=ngroups,
            conv_width=conv_width,
            chunk_size=chunk_size,
        )
        if nheads % ngroups:
            raise ValueError(f"MambaCore: nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"MambaCore: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"MambaCore: need 0 < A_init_range[0] <= A_init_range[1], got {A_init_range}")
        self.shape = SSDShape(nheads, headdim, ngroups, d_state, chunk_size, norm_eps)
        self.path = path
        self._init = (dt_min, dt_max, dt_init_floor, A_init_range)
        kw = {"device": device, "dtype": dtype}
        s = self.shape
        self.conv_weight = nn.Parameter(torch.empty(s.conv_dim, conv_width, **kw))
        self.conv_bias = nn.Parameter(torch.empty(s.conv_dim, **kw))
        self.dt_bias = nn.Parameter(torch.empty(nheads, **kw))
        self.A_log = nn.Parameter(torch.empty(nheads, **kw))
        self.D = nn.Parameter(torch.empty(nheads, **kw))
        self.norm_weight = nn.Parameter(torch.empty(s.d_inner, **kw))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # read by optimizer parameter grouping, as in mamba-ssm
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        dt_min, dt_max, dt_floor, (a_lo, a_hi) = self._init
        width = self.conv_weight.shape[1]
        bound = 1 / math.sqrt(width)  # torch's Conv1d default for a depthwise kernel (fan-in = width)
        self.conv_weight.uniform_(-bound, bound)
        self.conv_bias.uniform_(-bound, bound)
        dt_bias = dt_bias_init(self.shape.nheads, dt_min, dt_max, dt_floor, self.dt_bias.device)
        self.dt_bias.copy_(dt_bias)
        self.A_log.copy_(torch.empty_like(dt_bias).uniform_(a_lo, a_hi).log())
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    def forward(self, zxbcdt: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """zxbcdt [b, l, d_in_proj] laid out [z, x, B, C, dt]; seq_idx [b, l] integer document
        index per token (non-decreasing along a row), or None for one document per row."""
        s = self.shape
        if zxbcdt.dim() != 3 or zxbcdt.shape[-1] != s.d_in_proj:
            raise ValueError(
                f"MambaCore: expected the in_proj output [batch, seq, {s.d_in_proj}] "
                f"([z, x, B, C, dt] for {s.nheads} heads), got {tuple(zxbcdt.shape)}"
            )
        path = resolve_path(self._path, zxbcdt.device)
        if seq_idx is not None:
            seq_idx = check_seq_idx(seq_idx, zxbcdt, ordered_check=path == "reference")
        w = SSDWeights(self.conv_weight, self.conv_bias, self.dt_bias, self.A_log, self.D, self.norm_weight)
        return CORES[path](zxbcdt, w, s, seq_idx)

    def prefill(
        self, zxbcdt: torch.Tensor, seq_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MambaState]:
        """The forward on the chosen path, and the state after its last token (of that token's
        document) from one parallel pass in float32 (ops/ssd/step.py)."""
        y = self(zxbcdt, seq_idx)
        s, ct = self.shape, torch.promote_types(zxbcdt.dtype, torch.float32)
        _, xbc, dt = torch.split(zxbcdt.to(ct), [s.d_inner, s.conv_dim, s.nheads], dim=-1)
        conv = conv_state(xbc, seq_idx, self.conv_weight.shape[1])
        xbc = F.silu(causal_conv1d_torch(xbc, self.conv_weight.to(ct), self.conv_bias.to(ct), seq_idx))
        x, B, _ = torch.split(xbc, [s.d_inner, s.ngroups * s.d_state, s.ngroups * s.d_state], dim=-1)
        ssm = ssd_final_state(
            x.unflatten(-1, (s.nheads, s.headdim)),
            F.softplus(dt + self.dt_bias.to(ct)),
            -torch.exp(self.A_log.to(ct)),
            B.unflatten(-1, (s.ngroups, s.d_state)),
            seq_idx,
        )
        return y, MambaState(conv, ssm)

    def step(self, zxbcdt: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One token per row, zxbcdt [b, 1, d_in_proj] -> ([b, 1, d_inner], the next state): the
        reference recurrence in float32 on every device."""
        s, dtype = self.shape, zxbcdt.dtype
        ct = torch.promote_types(dtype, torch.float32)
        z, xbc, dt = torch.split(zxbcdt[:, 0].to(ct), [s.d_inner, s.conv_dim, s.nheads], dim=-1)
        xbc, conv = causal_conv1d_step(xbc, state.conv, self.conv_weight.to(ct), self.conv_bias.to(ct))
        x, B, C = torch.split(F.silu(xbc), [s.d_inner, s.ngroups * s.d_state, s.ngroups * s.d_state], dim=-1)
        y, ssm = ssd_step(
            state.ssm,
            x.unflatten(-1, (s.nheads, s.headdim)),
            F.softplus(dt + self.dt_bias.to(ct)),
            -torch.exp(self.A_log.to(ct)),
            B.unflatten(-1, (s.ngroups, s.d_state)),
            C.unflatten(-1, (s.ngroups, s.d_state)),
            self.D.to(ct),
        )
        y = gated_rmsnorm_torch(y.flatten(-2), z, self.norm_weight.to(ct), s.ngroups, s.norm_eps)
        return y.to(dtype)[:, None], MambaState(conv, ssm)

    def extra_repr(self) -> str:
        s = self.shape
        return (
            f"nheads={s.nheads}, headdim={s.headdim}, d_state={s.d_state}, ngroups={s.ngroups}, "
            f"chunk_size={s.chunk_size}, path={self._path!r}"
        )


class MambaMixer(CorePath, nn.Module):
    """The Mamba-2 SSD mixer on [batch, seq, hidden]: in_proj -> MambaCore -> out_proj.

    d_inner = expand * hidden_size = nheads * headdim. `path` picks the execution path ('auto',
    'fused', 'split', 'reference'); `resolved_path` says which one runs on the current device.
    """

    def __init__(
        self,
        hidden_size: int,
        expand: int = 2,
        headdim: int = 64,
        d_state: int = 64,
        ngroups: int = 1,
        conv_width: int = 4,
        chunk_size: int = 128,
        norm_eps: float = 1e-5,
        bias: bool = False,
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_inner = expand * hidden_size
        if hidden_size < 1 or expand < 1 or headdim < 1 or d_inner % headdim:
            raise ValueError(
                f"MambaMixer: expand * hidden_size ({expand} * {hidden_size}) must be a positive "
                f"multiple of headdim ({headdim})"
            )
        self.hidden_size = hidden_size
        self.core = MambaCore(
            d_inner // headdim,
            headdim=headdim,
            d_state=d_state,
            ngroups=ngroups,
            conv_width=conv_width,
            chunk_size=chunk_size,
            norm_eps=norm_eps,
            path=path,
            device=device,
            dtype=dtype,
        )
        self.in_proj = nn.Linear(
            hidden_size, self.core.shape.d_in_proj, bias=bias, device=device, dtype=dtype
        )
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=bias, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [b, l, hidden]; seq_idx [b, l] document index per token for packed rows
        (conv and SSM state reset where it changes), or None."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MambaMixer: expected [batch, seq, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        return self.out_proj(self.core(self.in_proj(hidden_states), seq_idx))

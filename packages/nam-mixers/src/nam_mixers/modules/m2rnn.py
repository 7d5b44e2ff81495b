"""The M2RNN mixer (the R block): projections around a core that runs the recurrence on its value heads.

    x [B, S, hidden] --qk_proj--> q, k      (G shared q/k heads of dim K)
                     --in_proj--> v, g, x_f (H value heads: V, V and 1 channels each, head-major)
    q, k, v <- SiLU(causal depthwise conv, width 4)        (not across document starts)
    f = exp(-exp(A_log) * softplus(x_f + dt_bias))          (forget gate, one per head and step)
    y = scan(q, k, v, f, W)                                 (ops/m2rnn; state K x V per value head)
    o = RMSNorm_per_head((y + D * v) * silu(g))  --out_proj--> [B, S, hidden]

The projections are plain nn.Linear modules that a tensor-parallel adapter can swap: in_proj's output
is head-major ([v_h, g_h, x_f,h] for h = 0..H-1) so a contiguous column split gives whole heads, and
out_proj's input is [H, V]. The core only sees the heads it is given; q/k are broadcast over the
value heads of their group, never repeated per head. The RMSNorm is per value head, so the math
does not depend on how heads are split across ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nam_mixers.ops.conv import causal_conv1d_silu, causal_conv1d_torch
from nam_mixers.ops.m2rnn import PATHS, M2RNNKernelConfig, m2rnn_scan


class M2RNNCore(nn.Module):
    """Everything between the projections: convs, gate, scan, skip, gated per-head RMSNorm.

    Takes qk [B, S, 2*G*K] (q then k) and vgf [B, S, H*(2V+1)] (head-major [v, g, x_f]); returns
    [B, S, H*V]. H is the number of value heads this module holds (the local ones under tensor
    parallelism).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim_k: int,
        head_dim_v: int,
        num_qk_heads: int = 1,
        conv_width: int = 4,
        norm_eps: float = 1e-5,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        path: str = "auto",
        kernel_config: M2RNNKernelConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_qk_heads:
            raise ValueError(
                f"M2RNN: num_heads ({num_heads}) must be a multiple of num_qk_heads ({num_qk_heads})"
            )
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"M2RNN: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if path not in PATHS:
            raise ValueError(f"M2RNN: path must be one of {PATHS}, got {path!r}")
        self.num_heads, self.num_qk_heads = num_heads, num_qk_heads
        self.head_dim_k, self.head_dim_v = head_dim_k, head_dim_v
        self.norm_eps, self.path, self.kernel_config = norm_eps, path, kernel_config
        fk = {"device": device, "dtype": dtype}
        qk_ch, v_ch = 2 * num_qk_heads * head_dim_k, num_heads * head_dim_v
        self.qk_conv_weight = nn.Parameter(torch.empty(qk_ch, conv_width, **fk))
        self.qk_conv_bias = nn.Parameter(torch.empty(qk_ch, **fk))
        self.v_conv_weight = nn.Parameter(torch.empty(v_ch, conv_width, **fk))
        self.v_conv_bias = nn.Parameter(torch.empty(v_ch, **fk))
        self.A_log = nn.Parameter(torch.empty(num_heads, **fk))
        self.dt_bias = nn.Parameter(torch.empty(num_heads, **fk))
        self.W = nn.Parameter(torch.empty(num_heads, head_dim_v, head_dim_v, **fk))
        self.D = nn.Parameter(torch.empty(num_heads, **fk))
        self.norm_weight = nn.Parameter(torch.empty(v_ch, **fk))
        self._dt_range = (dt_min, dt_max)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W = I; A = 1 and dt log-uniform in [dt_min, dt_max] per head, so at x_f = 0 the forget gate
        f = exp(-dt) lies in [exp(-dt_max), exp(-dt_min)] = [0.905, 0.999] by default: memory time
        constants of 10 to 1000 steps spread over the heads (Mamba-2's choice for its decay)."""
        bound = 1.0 / math.sqrt(self.qk_conv_weight.shape[1])  # depthwise conv: fan-in = width
        for p in (self.qk_conv_weight, self.qk_conv_bias, self.v_conv_weight, self.v_conv_bias):
            p.uniform_(-bound, bound)
        self.A_log.zero_()
        lo, hi = (math.log(d) for d in self._dt_range)
        dt = torch.exp(torch.rand(self.num_heads, device=self.dt_bias.device) * (hi - lo) + lo)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt)
        self.W.copy_(torch.eye(self.head_dim_v).expand_as(self.W))
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    def _conv(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seq_idx: torch.Tensor | None
    ) -> torch.Tensor:
        """SiLU(causal conv); the reference path stays pure PyTorch end to end."""
        if self.path == "reference":
            return F.silu(causal_conv1d_torch(x, weight, bias, seq_idx))
        return causal_conv1d_silu(x, weight, bias, seq_idx)

    def forget_gate(self, x_f: torch.Tensor) -> torch.Tensor:
        """f = exp(-exp(A_log) * softplus(x_f + dt_bias)) in float32; x_f [B, S, H]."""
        a = torch.exp(self.A_log.float())
        return torch.exp(-a * F.softplus(x_f.float() + self.dt_bias.float()))

    def forward(
        self, qk: torch.Tensor, vgf: torch.Tensor, seq_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, s, _ = vgf.shape
        h, g, dk, dv = self.num_heads, self.num_qk_heads, self.head_dim_k, self.head_dim_v
        if qk.shape != (b, s, 2 * g * dk) or vgf.shape[2] != h * (2 * dv + 1):
            raise ValueError(
                f"M2RNNCore: expected qk [B, S, {2 * g * dk}] and vgf [B, S, {h * (2 * dv + 1)}], "
                f"got {tuple(qk.shape)} and {tuple(vgf.shape)}"
            )
        qk = self._conv(qk, self.qk_conv_weight, self.qk_conv_bias, seq_idx)
        q, k = qk.view(b, s, 2, g, dk).unbind(2)
        vgf = vgf.view(b, s, h, 2 * dv + 1)
        v_in, gate, x_f = vgf.split([dv, dv, 1], dim=-1)
        v = self._conv(v_in.reshape(b, s, h * dv), self.v_conv_weight, self.v_conv_bias, seq_idx)
        v = v.view(b, s, h, dv)
        f = self.forget_gate(x_f.squeeze(-1))
        y, _ = m2rnn_scan(q, k, v, f, self.W, seq_idx=seq_idx, path=self.path, config=self.kernel_config)
        o = (y.float() + self.D.float()[:, None] * v.float()) * F.silu(gate.float())
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return (o.reshape(b, s, h * dv) * self.norm_weight.float()).to(vgf.dtype)


class M2RNN(nn.Module):
    """The M2RNN mixer on [batch, seq, hidden]. NAM56R: 44 value heads of dim 16, one q/k head of dim 64.

    path: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "reference".
    seq_idx [B, S] (int): packed rows; the state and the convolutions restart where its value changes.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 44,
        head_dim_k: int = 64,
        head_dim_v: int = 16,
        num_qk_heads: int = 1,
        conv_width: int = 4,
        norm_eps: float = 1e-5,
        path: str = "auto",
        kernel_config: M2RNNKernelConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.qk_proj = nn.Linear(hidden_size, 2 * num_qk_heads * head_dim_k, bias=False, **fk)
        self.in_proj = nn.Linear(hidden_size, num_heads * (2 * head_dim_v + 1), bias=False, **fk)
        self.core = M2RNNCore(
            num_heads,
            head_dim_k,
            head_dim_v,
            num_qk_heads=num_qk_heads,
            conv_width=conv_width,
            norm_eps=norm_eps,
            path=path,
            kernel_config=kernel_config,
            **fk,
        )
        self.out_proj = nn.Linear(num_heads * head_dim_v, hidden_size, bias=False, **fk)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"M2RNN: x must be [batch, seq, hidden], got shape {tuple(x.shape)}")
        return self.out_proj(self.core(self.qk_proj(x), self.in_proj(x), seq_idx))

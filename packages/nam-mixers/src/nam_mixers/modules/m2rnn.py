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

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nam_mixers.ops.conv import causal_conv1d_silu, causal_conv1d_step, causal_conv1d_torch, conv_state
from nam_mixers.ops.m2rnn import PATHS, M2RNNKernelConfig, m2rnn_scan, m2rnn_scan_reference


@functools.cache
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the gate and the output norm compute in: float32, float64 for float64 (looked up once
    per dtype: torch.promote_types is a dispatcher call)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class M2RNNState:
    """What one token of incremental decoding needs of the past, float32: the q/k and v convs'
    last inputs [B, width - 1, channels] and the scan state h [B, H, K, V]."""

    qk_conv: torch.Tensor
    v_conv: torch.Tensor
    h: torch.Tensor  # float64 for float64 inputs


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
        """f = exp(-exp(A_log) * softplus(x_f + dt_bias)) in float32 (float64 stays float64); x_f
        [B, S, H]. dt_bias joins the sum as it is: the add upcasts it exactly, with no copy of its own."""
        ct = _compute_dtype(x_f.dtype)
        a = torch.exp(self.A_log.to(ct))
        return torch.exp(-a * F.softplus(x_f.to(ct) + self.dt_bias))

    def _check(self, qk: torch.Tensor, vgf: torch.Tensor) -> None:
        b, s, _ = vgf.shape
        h, g, dk, dv = self.num_heads, self.num_qk_heads, self.head_dim_k, self.head_dim_v
        if qk.shape != (b, s, 2 * g * dk) or vgf.shape[2] != h * (2 * dv + 1):
            raise ValueError(
                f"M2RNNCore: expected qk [B, S, {2 * g * dk}] and vgf [B, S, {h * (2 * dv + 1)}], "
                f"got {tuple(qk.shape)} and {tuple(vgf.shape)}"
            )

    def _split_vgf(self, vgf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head-major [v, g, x_f] -> v [B, S, H*V] (before its conv), gate [B, S, H, V], x_f [B, S, H]."""
        b, s, _ = vgf.shape
        v_in, gate, x_f = vgf.view(b, s, self.num_heads, 2 * self.head_dim_v + 1).split(
            [self.head_dim_v, self.head_dim_v, 1], dim=-1
        )
        return v_in.reshape(b, s, -1), gate, x_f.squeeze(-1)

    def _output(
        self, y: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """(y + D v) * silu(g), RMS-normed per value head, in float32 (float64 stays float64);
        [B, S, H*V] in ``dtype``. y, D and the norm weight meet an operand of that type, which
        upcasts them exactly inside the op: no copies of their own."""
        b, s = y.shape[:2]
        ct = _compute_dtype(dtype)
        o = (y + self.D[:, None] * v.to(ct)) * F.silu(gate.to(ct))
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return (o.reshape(b, s, -1) * self.norm_weight).to(dtype)

    def _scan(
        self, qk: torch.Tensor, vgf: torch.Tensor, seq_idx: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and the scan's final state."""
        self._check(qk, vgf)
        b, s, _ = vgf.shape
        qk = self._conv(qk, self.qk_conv_weight, self.qk_conv_bias, seq_idx)
        q, k = qk.view(b, s, 2, self.num_qk_heads, self.head_dim_k).unbind(2)
        v_in, gate, x_f = self._split_vgf(vgf)
        v = self._conv(v_in, self.v_conv_weight, self.v_conv_bias, seq_idx).view(b, s, self.num_heads, -1)
        y, h = m2rnn_scan(
            q, k, v, self.forget_gate(x_f), self.W, seq_idx=seq_idx, path=self.path, config=self.kernel_config
        )
        return self._output(y, v, gate, vgf.dtype), h

    def forward(
        self, qk: torch.Tensor, vgf: torch.Tensor, seq_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._scan(qk, vgf, seq_idx)[0]

    def prefill(
        self, qk: torch.Tensor, vgf: torch.Tensor, seq_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, M2RNNState]:
        """The forward, and the state after its last token (of that token's document): the scan's
        final state and the convs' last inputs."""
        y, h = self._scan(qk, vgf, seq_idx)
        width = self.qk_conv_weight.shape[1]
        v_in = self._split_vgf(vgf)[0]
        ct = _compute_dtype(vgf.dtype)
        qk_conv, v_conv = (conv_state(x.to(ct), seq_idx, width) for x in (qk, v_in))
        return y, M2RNNState(qk_conv, v_conv, h)

    def step(self, qk: torch.Tensor, vgf: torch.Tensor, state: M2RNNState) -> tuple[torch.Tensor, M2RNNState]:
        """One token per row (qk, vgf [B, 1, ...]) through the reference recurrence: the convs from
        their saved inputs, one step of the scan from the saved state."""
        self._check(qk, vgf)
        b, ct = vgf.shape[0], _compute_dtype(vgf.dtype)
        q_k, qk_conv = causal_conv1d_step(
            qk[:, 0].to(ct), state.qk_conv, self.qk_conv_weight.to(ct), self.qk_conv_bias.to(ct)
        )
        q, k = F.silu(q_k).view(b, 1, 2, self.num_qk_heads, self.head_dim_k).unbind(2)
        v_in, gate, x_f = self._split_vgf(vgf)
        v, v_conv = causal_conv1d_step(
            v_in[:, 0].to(ct), state.v_conv, self.v_conv_weight.to(ct), self.v_conv_bias.to(ct)
        )
        v = F.silu(v).view(b, 1, self.num_heads, self.head_dim_v)
        y, h = m2rnn_scan_reference(q, k, v, self.forget_gate(x_f), self.W.to(ct), h0=state.h)
        return self._output(y, v, gate, vgf.dtype), M2RNNState(qk_conv, v_conv, h)


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

"""From the in_proj output to what the Mamba-3 scan takes, in plain PyTorch (reference and decode).

    [z, x, B, C, dt, A, trap] (d_inner, d_inner, g*n, g*n, heads, heads, heads) and angles [a]:
    dt = softplus(dt + dt_bias);  A = min(-softplus(A), -A_floor);  lambda = sigmoid(trap)
    k = RMSNorm(B) * B_norm_weight + B_bias[h];  q = RMSNorm(C) * C_norm_weight + C_bias[h]
    theta_t = sum over the document's tokens s <= t of pi * tanh(angles_s) * dt_s   (per head)
    q, k rotated by theta in the pairs (2i, 2i+1), i < a (the rest of d_state unrotated)

The angle projection is shared by all heads; theta differs per head through dt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Mamba3Shape:
    """Sizes of one core: its (local) heads, their B/C groups, state size, rotary angles, chunk."""

    nheads: int
    headdim: int
    ngroups: int
    d_state: int
    n_angles: int
    chunk_size: int
    A_floor: float
    norm_eps: float

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def d_in_proj(self) -> int:
        """Width of the in_proj output, laid out [z, x, B, C, dt, A, trap]."""
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + 3 * self.nheads

    @property
    def widths(self) -> list[int]:
        gn = self.ngroups * self.d_state
        return [self.d_inner, self.d_inner, gn, gn, self.nheads, self.nheads, self.nheads]


def rotary_angles(d_state: int, rope_fraction: float) -> int:
    """Angles rotating the first rope_fraction of d_state in pairs (mamba-ssm's Mamba3 count)."""
    rotated = int(d_state * rope_fraction)
    return (rotated - rotated % 2) // 2


@dataclass(frozen=True)
class Mamba3Weights:
    """The core's parameters: dt_bias and D per head, B/C biases [heads, d_state], B/C norm weights
    [d_state]."""

    dt_bias: torch.Tensor
    B_bias: torch.Tensor
    C_bias: torch.Tensor
    B_norm_weight: torch.Tensor
    C_norm_weight: torch.Tensor
    D: torch.Tensor


@dataclass(frozen=True)
class Mamba3Inputs:
    """Per token, in the compute dtype: q, k [b, l, h, n] (normed, biased, not yet rotated), v and z
    [b, l, h, p], dt, adt = A dt and lambda [b, l, h], angle rates pi tanh(angles) dt [b, l, h, a]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    z: torch.Tensor
    dt: torch.Tensor
    adt: torch.Tensor
    lam: torch.Tensor
    rate: torch.Tensor


def prepare(zxbcdt: torch.Tensor, angles: torch.Tensor, w: Mamba3Weights, s: Mamba3Shape) -> Mamba3Inputs:
    """zxbcdt [..., d_in_proj] and angles [..., a] (any leading dims, in the compute dtype)."""
    z, x, B, C, dd_dt, dd_A, trap = torch.split(zxbcdt, s.widths, dim=-1)
    ct = zxbcdt.dtype
    dt = F.softplus(dd_dt + w.dt_bias.to(ct))
    adt = (-F.softplus(dd_A)).clamp(max=-s.A_floor) * dt
    per_group = s.nheads // s.ngroups

    def qk(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        t = F.rms_norm(t.unflatten(-1, (s.ngroups, s.d_state)), (s.d_state,), weight.to(ct), s.norm_eps)
        return t.repeat_interleave(per_group, dim=-2) + bias.to(ct)

    heads = (s.nheads, s.headdim)
    rate = math.pi * torch.tanh(angles)[..., None, :] * dt[..., None]
    return Mamba3Inputs(
        q=qk(C, w.C_norm_weight, w.C_bias),
        k=qk(B, w.B_norm_weight, w.B_bias),
        v=x.unflatten(-1, heads),
        z=z.unflatten(-1, heads),
        dt=dt,
        adt=adt,
        lam=torch.sigmoid(trap),
        rate=rate,
    )


def rotate(t: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """t [..., n] with the pairs (2i, 2i+1), i < a, rotated by theta [..., a]; the rest unchanged."""
    a = theta.shape[-1]
    t0, t1 = t[..., : 2 * a].unflatten(-1, (a, 2)).unbind(-1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    turned = torch.stack([t0 * cos - t1 * sin, t0 * sin + t1 * cos], dim=-1).flatten(-2)
    return torch.cat([turned, t[..., 2 * a :]], dim=-1)


def document_cumsum(x: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """Running sum of x [b, l, ...] along l, restarting where seq_idx [b, l] changes."""
    cum = torch.cumsum(x, dim=1)
    if seq_idx is None:
        return cum
    b, seqlen = seq_idx.shape
    pos = torch.arange(seqlen, device=x.device).expand(b, seqlen)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.where(starts, pos, 0).cummax(dim=1).values  # each token's document start
    before = (cum - x).gather(1, first.view(b, seqlen, *[1] * (x.dim() - 2)).expand_as(x))
    return cum - before


def next_in_document(x: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """x [b, l, ...] of the next token where it is in the same document, else 0."""
    nxt = torch.zeros_like(x)
    nxt[:, :-1] = x[:, 1:]
    if seq_idx is not None:
        same = (seq_idx[:, 1:] == seq_idx[:, :-1]).view(*seq_idx.shape[:1], -1, *[1] * (x.dim() - 2))
        nxt[:, :-1] = nxt[:, :-1] * same
    return nxt

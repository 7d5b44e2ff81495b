"""The Mamba-3 recurrence one token at a time (incremental decoding, and the definition the chunked
scan is tested against), and the state after a prompt in one parallel pass.

Per head, with q, k rotated by the running angle theta_t = theta_{t-1} + rate_t:

    h_t = alpha_t (h_{t-1} + beta_t v_{t-1} k_{t-1}^T) + gamma_t v_t k_t^T,   y_t = h_t q_t + D v_t

alpha = exp(A dt), beta = (1 - lambda) dt, gamma = lambda dt. A document starts from the zero state
(h, k_{t-1}, v_{t-1} and theta all zero), which is what the state of a fresh row holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nam_mixers.ops.mamba3.inputs import Mamba3Inputs, document_cumsum, next_in_document, rotate


@dataclass(frozen=True)
class Mamba3State:
    """What the next token needs of the past, float32 (float64 stays float64): the scan state h
    [b, heads, head_dim, d_state], the last token's rotated k [b, heads, d_state] and v
    [b, heads, head_dim], and the running angle [b, heads, a]."""

    h: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    angle: torch.Tensor

    @classmethod
    def zeros(
        cls, b: int, nheads: int, headdim: int, d_state: int, n_angles: int, like: torch.Tensor
    ) -> Mamba3State:
        return cls(
            like.new_zeros(b, nheads, headdim, d_state),
            like.new_zeros(b, nheads, d_state),
            like.new_zeros(b, nheads, headdim),
            like.new_zeros(b, nheads, n_angles),
        )


def mamba3_step(state: Mamba3State, t: Mamba3Inputs, D: torch.Tensor) -> tuple[torch.Tensor, Mamba3State]:
    """One token: t's tensors without the sequence dim (q, k [b, h, n], v [b, h, p], dt, adt, lam
    [b, h], rate [b, h, a]) -> (y [b, h, p] before the z gate, the next state)."""
    angle = torch.remainder(state.angle + t.rate, 2 * math.pi)  # bounded, as the kernel keeps it
    q, k = rotate(t.q, angle), rotate(t.k, angle)
    previous = ((1 - t.lam) * t.dt)[..., None, None] * state.v[..., :, None] * state.k[..., None, :]
    h = torch.exp(t.adt)[..., None, None] * (state.h + previous)
    h = h + (t.lam * t.dt)[..., None, None] * t.v[..., :, None] * k[..., None, :]
    y = torch.einsum("bhpn,bhn->bhp", h, q) + D[:, None] * t.v
    return y, Mamba3State(h, k, t.v, angle)


def mamba3_final_state(t: Mamba3Inputs, seq_idx: torch.Tensor | None) -> Mamba3State:
    """The state after the last token of [b, l] inputs, counting only that token's document."""
    theta = document_cumsum(t.rate, seq_idx)
    k = rotate(t.k, theta)
    scale = t.lam * t.dt + next_in_document((1 - t.lam) * t.dt, seq_idx)
    cum = torch.cumsum(t.adt, dim=1)
    weight = torch.exp(cum[:, -1:] - cum) * scale
    if seq_idx is not None:
        weight = weight * (seq_idx == seq_idx[:, -1:])[..., None].to(weight.dtype)
    h = torch.einsum("blh,blhp,blhn->bhpn", weight, t.v, k)
    return Mamba3State(h, k[:, -1], t.v[:, -1], torch.remainder(theta[:, -1], 2 * math.pi))

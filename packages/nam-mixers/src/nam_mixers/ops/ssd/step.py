"""Incremental decoding of the SSD scan: the state after a prompt, and one token at a time.

Mamba-2's recurrence per head, with state h [headdim, d_state]:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t

so the state after the prompt is sum_t exp(A (cum_T - cum_t)) dt_t x_t B_t^T over the tokens of the
last document (cum = cumulative sum of dt): one parallel pass, no chunked scan needed. Both run
in float32 (float64 stays float64), on any device.
"""

from __future__ import annotations

import torch


def ssd_final_state(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """x [b, l, h, p], dt [b, l, h] (after softplus), A [h], B [b, l, g, n] -> state [b, h, p, n]
    after the last token, counting only the last token's document."""
    heads_per_group = x.shape[2] // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)  # [b, l, h, n]
    cum = torch.cumsum(dt * A, dim=1)  # [b, l, h]
    weight = torch.exp(cum[:, -1:] - cum) * dt
    if seq_idx is not None:
        weight = weight * (seq_idx == seq_idx[:, -1:])[..., None].to(weight.dtype)
    return torch.einsum("blh,blhp,blhn->bhpn", weight, x, B)


def ssd_step(
    h: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: h [b, h, p, n], x [b, h, p], dt [b, h] (after softplus), B, C [b, g, n], D [h]
    -> (y [b, h, p], the next state)."""
    heads_per_group = x.shape[1] // B.shape[1]
    B, C = (t.repeat_interleave(heads_per_group, dim=1) for t in (B, C))
    h = h * torch.exp(dt * A)[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", h, C) + D[:, None] * x
    return y, h

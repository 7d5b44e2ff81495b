"""The M2RNN scan as a plain per-step PyTorch loop: the definition the Triton kernels are tested against.

Per value head, with state h (K x V), one shared q/k head per group of value heads:

    z_t = h_{t-1} @ W + k_t v_t^T
    h_t = f_t * h_{t-1} + (1 - f_t) * tanh(z_t)
    y_t = q_t^T h_t

where h_{t-1} is zero at a document start (seq_idx[t] != seq_idx[t-1]) and h0 (or zero) before t = 0.
Runs in float32, or float64 when the inputs are float64 (for gradcheck); autograd gives the backward.
"""

from __future__ import annotations

import torch

from nam_mixers.ops.m2rnn.shapes import check_scan_inputs


def m2rnn_scan_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    w: torch.Tensor,
    h0: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, S, G, K]; v [B, S, H, V]; f [B, S, H] in (0, 1); W [H, V, V]; h0 [B, H, K, V].

    Returns y [B, S, H, V] in v's dtype and the final state [B, H, K, V] in float32 (float64 for float64).
    """
    d = check_scan_inputs(q, k, v, f, w, h0, seq_idx)
    r = d.heads // d.qk_heads
    dt = torch.promote_types(v.dtype, torch.float32)
    # Value heads grouped under their q/k head: [B, G, R, ...]; q and k broadcast over R, never repeated.
    qs, ks = q.to(dt), k.to(dt)
    vs = v.to(dt).view(d.batch, d.seq, d.qk_heads, r, d.v)
    fs = f.to(dt).view(d.batch, d.seq, d.qk_heads, r, 1, 1)
    ws = w.to(dt).view(d.qk_heads, r, d.v, d.v)
    if h0 is None:
        h = torch.zeros(d.batch, d.qk_heads, r, d.k, d.v, dtype=dt, device=v.device)
    else:
        h = h0.to(dt).view(d.batch, d.qk_heads, r, d.k, d.v)
    ys = []
    for t in range(d.seq):
        if seq_idx is not None and t > 0:
            start = (seq_idx[:, t] != seq_idx[:, t - 1]).view(d.batch, 1, 1, 1, 1)
            h = torch.where(start, torch.zeros_like(h), h)
        z = h @ ws + ks[:, t, :, None, :, None] * vs[:, t, :, :, None, :]
        ft = fs[:, t]
        h = ft * h + (1 - ft) * torch.tanh(z)
        ys.append(torch.einsum("bgk,bgrkv->bgrv", qs[:, t], h).reshape(d.batch, d.heads, d.v))
    y = torch.stack(ys, dim=1).to(v.dtype)
    return y, h.reshape(d.batch, d.heads, d.k, d.v)

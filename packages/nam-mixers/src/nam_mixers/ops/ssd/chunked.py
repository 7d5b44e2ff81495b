"""The Mamba-2 SSD scan in plain PyTorch, chunk by chunk: the reference the fast paths are held to.

Per head h with scalar decay a_t = exp(dt_t * A_h) and a state S (head_dim x d_state):

    S_t = a_t * S_{t-1} + dt_t * x_t B_t^T        y_t = S_t C_t + D_h * x_t

and S is reset to zero where a new document starts (seq_idx changes). Chunks of Q steps turn the
recurrence into matmuls: inside a chunk y_i = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j with
cs the running sum of dt * A, plus the state entering the chunk decayed by exp(cs_i); states pass
between chunks in a short loop. Runs on any device and dtype, float64 included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [b, l, h, p] from x [b, l, h, p], dt [b, l, h] (positive: softplus already applied),
    A [h] (negative), B and C [b, l, g, n] shared by the h // g heads of each group, D [h],
    seq_idx [b, l] (document index per token, non-decreasing along a row)."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    q = chunk_size
    c = -(-seqlen // q)
    pad = c * q - seqlen
    if pad:  # zero dt and x at the tail: the padding neither feeds the state nor is returned
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    x = x.reshape(b, c, q, g, r, p)
    B = B.reshape(b, c, q, g, n)
    C = C.reshape(b, c, q, g, n)
    dt = dt.reshape(b, c, q, g, r).permute(0, 1, 3, 4, 2)  # [b, c, g, r, q]
    cs = torch.cumsum(dt * A.reshape(g, r, 1), dim=-1)

    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    if seq_idx is None:
        pair = causal  # [q, q]: j may feed i
        to_end = from_prev = None
        keep = None
    else:
        s = seq_idx.reshape(b, c, q)
        pair = causal & (s[:, :, :, None] == s[:, :, None, :])  # [b, c, q, q]
        pair = pair[:, :, None, None]
        to_end = (s == s[:, :, -1:])[:, :, None, None]  # token j reaches the end of its chunk
        prev_last = torch.cat([s[:, :1, :1], s[:, :-1, -1:]], dim=1)  # last token of the chunk before
        from_prev = (s == prev_last)[:, :, None, None]  # the entering state reaches token i
        keep = s[:, :, -1] == prev_last[:, :, 0]  # [b, c]: the entering state reaches the chunk end

    # inside each chunk
    decay = torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~pair, float("-inf")))
    cb = torch.einsum("bcign,bcjgn->bcgij", C, B)
    y = torch.einsum("bcgrij,bcjgrp->bcigrp", cb[:, :, :, None] * decay * dt[..., None, :], x)

    # the state each chunk hands on, from its own tokens only
    w = torch.exp(cs[..., -1:] - cs) * dt
    if to_end is not None:
        w = w * to_end
    states = torch.einsum("bcgrj,bcjgn,bcjgrp->bcgrpn", w, B, x)

    # pass states across chunks: entering[k] is the state before chunk k's first token
    chunk_decay = torch.exp(cs[..., -1])  # [b, c, g, r]
    entering = [torch.zeros_like(states[:, 0])]
    for k in range(1, c):
        carried = entering[-1] * chunk_decay[:, k - 1, :, :, None, None]
        if keep is not None:
            carried = carried * keep[:, k - 1, None, None, None, None]
        entering.append(carried + states[:, k - 1])
    prev = torch.stack(entering, dim=1)  # [b, c, g, r, p, n]
    into = torch.exp(cs)
    if from_prev is not None:
        into = into * from_prev
    y = y + torch.einsum("bcign,bcgrpn,bcgri->bcigrp", C, prev, into)

    y = y.reshape(b, c * q, h, p)[:, :seqlen]
    if D is not None:
        y = y + D[:, None] * x.reshape(b, c * q, h, p)[:, :seqlen]
    return y

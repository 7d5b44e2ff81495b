"""The Mamba-3 SISO scan in plain PyTorch, chunk by chunk: the reference the Triton path is held to.

Per head, with state h (head_dim x d_state), decay alpha_t = exp(A_t dt_t), gamma_t = lambda_t dt_t
and beta_t = (1 - lambda_t) dt_t (trapezoidal discretisation, lambda = sigmoid(trap)), and q, k
already rotated (step.py states the recurrence one token at a time):

    h_t = alpha_t h_{t-1} + alpha_t beta_t v_{t-1} k_{t-1}^T + gamma_t v_t k_t^T,   y_t = h_t q_t

Unrolled, token s < t feeds y_t with weight exp(cs_t - cs_s) (gamma_s + beta_{s+1}) (cs the running
sum of A dt) and token t itself with gamma_t: the matmul form used inside a chunk. beta_{s+1} is 0
where s is the last token of its document; the state restarts at a document start (seq_idx).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mamba3_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    adt: torch.Tensor,
    gamma: torch.Tensor,
    scale: torch.Tensor,
    chunk_size: int,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [b, l, h, p] (no D skip) from rotated q, k [b, l, h, n], v [b, l, h, p], and per token and
    head adt = A dt (negative), gamma = lambda dt and scale = gamma + beta of the next token of the
    same document [b, l, h]; seq_idx [b, l] document index per token (non-decreasing along a row)."""
    b, seqlen, h, p = v.shape
    n = q.shape[-1]
    cq = chunk_size
    c = -(-seqlen // cq)
    pad = c * cq - seqlen
    if pad:  # zero inputs at the tail: the padding neither feeds the state nor is returned
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        adt, gamma, scale = (F.pad(t, (0, 0, 0, pad)) for t in (adt, gamma, scale))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    q, k = q.reshape(b, c, cq, h, n), k.reshape(b, c, cq, h, n)
    v = v.reshape(b, c, cq, h, p)
    adt, gamma, scale = (t.reshape(b, c, cq, h).transpose(2, 3) for t in (adt, gamma, scale))  # [b, c, h, q]
    cs = torch.cumsum(adt, dim=-1)

    strict = torch.ones(cq, cq, dtype=torch.bool, device=v.device).tril(-1)
    if seq_idx is None:
        pair, to_end, from_prev, keep = strict, None, None, None
    else:
        s = seq_idx.reshape(b, c, cq)
        pair = (strict & (s[:, :, :, None] == s[:, :, None, :]))[:, :, None]  # [b, c, 1, q, q]
        to_end = (s == s[:, :, -1:])[:, :, None]  # token j reaches the end of its chunk
        prev_last = torch.cat([s[:, :1, :1], s[:, :-1, -1:]], dim=1)
        from_prev = (s == prev_last)[:, :, None]  # the entering state reaches token i
        keep = s[:, :, -1] == prev_last[:, :, 0]  # [b, c]: the entering state reaches the chunk end

    # inside each chunk: earlier tokens through the decayed, scaled q.k; the token itself through gamma
    decay = torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~pair, float("-inf")))
    qk = torch.einsum("bcihn,bcjhn->bchij", q, k)
    y = torch.einsum("bchij,bcjhp->bcihp", qk * decay * scale[..., None, :], v)
    diag = torch.diagonal(qk, dim1=-2, dim2=-1) * gamma  # [b, c, h, q]
    y = y + diag.transpose(2, 3)[..., None] * v

    # the state each chunk hands on, from its own tokens only
    w = torch.exp(cs[..., -1:] - cs) * scale
    if to_end is not None:
        w = w * to_end
    states = torch.einsum("bchj,bcjhn,bcjhp->bchpn", w, k, v)
    chunk_decay = torch.exp(cs[..., -1])  # [b, c, h]
    entering = [torch.zeros_like(states[:, 0])]
    for i in range(1, c):
        carried = entering[-1] * chunk_decay[:, i - 1, :, None, None]
        if keep is not None:
            carried = carried * keep[:, i - 1, None, None, None]
        entering.append(carried + states[:, i - 1])
    prev = torch.stack(entering, dim=1)  # [b, c, h, p, n]
    into = torch.exp(cs)
    if from_prev is not None:
        into = into * from_prev
    y = y + torch.einsum("bcihn,bchpn,bchi->bcihp", q, prev, into)
    return y.reshape(b, c * cq, h, p)[:, :seqlen]

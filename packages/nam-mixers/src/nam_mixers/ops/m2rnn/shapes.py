"""Shape and dtype contract of the M2RNN scan, shared by every path so they reject the same inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScanDims:
    batch: int
    seq: int
    qk_heads: int  # G: q/k heads, each shared by heads // qk_heads value heads
    heads: int  # H: value heads
    k: int  # K: q/k head dim, rows of the state
    v: int  # V: value head dim, columns of the state


def check_scan_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    w: torch.Tensor,
    h0: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> ScanDims:
    """Validate the scan inputs and return their dimensions; errors name the tensor and the expected shape."""
    if q.dim() != 4:
        raise ValueError(f"m2rnn scan: q must be [batch, seq, qk_heads, K], got shape {tuple(q.shape)}")
    b, s, g, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"m2rnn scan: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:2] != (b, s):
        raise ValueError(f"m2rnn scan: v must be [batch={b}, seq={s}, heads, V], got shape {tuple(v.shape)}")
    h, dv = v.shape[2:]
    if h % g:
        raise ValueError(f"m2rnn scan: value heads ({h}) must be a multiple of q/k heads ({g})")
    if f.shape != (b, s, h):
        raise ValueError(
            f"m2rnn scan: forget gate f must be [batch, seq, heads] = {(b, s, h)}, got {tuple(f.shape)}"
        )
    if w.shape != (h, dv, dv):
        raise ValueError(f"m2rnn scan: W must be [heads, V, V] = {(h, dv, dv)}, got {tuple(w.shape)}")
    if h0 is not None and h0.shape != (b, h, dk, dv):
        raise ValueError(
            f"m2rnn scan: initial state must be [batch, heads, K, V] = {(b, h, dk, dv)}, got {tuple(h0.shape)}"
        )
    if seq_idx is not None:
        if seq_idx.shape != (b, s):
            raise ValueError(
                f"m2rnn scan: seq_idx must be [batch, seq] = {(b, s)}, got {tuple(seq_idx.shape)}"
            )
        if seq_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"m2rnn scan: seq_idx must be int32 or int64, got {seq_idx.dtype}")
    floats = {"q": q, "k": k, "v": v, "f": f, "W": w} | ({"h0": h0} if h0 is not None else {})
    for name, t in floats.items():
        if not t.is_floating_point():
            raise ValueError(f"m2rnn scan: {name} must be a floating-point tensor, got {t.dtype}")
    devices = {t.device for t in floats.values()} | ({seq_idx.device} if seq_idx is not None else set())
    if len(devices) > 1:
        raise ValueError(f"m2rnn scan: all inputs must be on one device, got {sorted(map(str, devices))}")
    return ScanDims(batch=b, seq=s, qk_heads=g, heads=h, k=dk, v=dv)

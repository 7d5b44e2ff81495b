"""The M2RNN scan entry point: path selection and the autograd Function around the Triton kernels."""

from __future__ import annotations

from typing import Any

import torch

from nam_mixers.ops.m2rnn.config import M2RNNKernelConfig
from nam_mixers.ops.m2rnn.reference import m2rnn_scan_reference
from nam_mixers.ops.m2rnn.shapes import ScanDims, check_scan_inputs
from nam_mixers.ops.triton_paths import resolve_triton_path


def resolve_path(path: str, device: torch.device) -> str:
    """Map a requested path to the one that runs (nam_mixers.ops.triton_paths)."""
    return resolve_triton_path("m2rnn", path, device)


class _M2RNNScan(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        f: torch.Tensor,
        w: torch.Tensor,
        h0: torch.Tensor | None,
        seq_idx: torch.Tensor | None,
        dims: ScanDims,
        config: M2RNNKernelConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from nam_mixers.ops.m2rnn.forward import m2rnn_forward

        q, k, v, f, w = (t.contiguous() for t in (q, k, v, f, w))
        h0 = h0.contiguous() if h0 is not None else None
        seq_idx = seq_idx.contiguous() if seq_idx is not None else None
        y, ht, ckpt = m2rnn_forward(q, k, v, f, w, h0, seq_idx, dims, config.forward, config.chunk)
        ctx.save_for_backward(q, k, v, f, w, seq_idx, ckpt)
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        ctx.dims, ctx.config = dims, config
        ctx.set_materialize_grads(False)
        return y, ht

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, dht: torch.Tensor | None) -> tuple[Any, ...]:
        from nam_mixers.ops.m2rnn.backward import m2rnn_backward

        q, k, v, f, w, seq_idx, ckpt = ctx.saved_tensors
        dy = torch.zeros_like(v) if dy is None else dy.contiguous()
        dht = dht.contiguous() if dht is not None else None
        cfg: M2RNNKernelConfig = ctx.config
        dq, dk, dv, df, dw, dh0 = m2rnn_backward(
            q,
            k,
            v,
            f,
            w,
            seq_idx,
            ckpt,
            dy,
            dht,
            ctx.h0_dtype is not None,
            ctx.dims,
            cfg.backward,
            cfg.chunk,
            cfg.dqk,
        )
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            df.to(f.dtype),
            dw.to(w.dtype),
            dh0.to(ctx.h0_dtype) if dh0 is not None else None,
            None,
            None,
            None,
        )


def m2rnn_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    w: torch.Tensor,
    h0: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    *,
    path: str = "auto",
    config: M2RNNKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The M2RNN recurrence over time (semantics in reference.py), differentiable on every path.

    q, k [B, S, G, K] (one q/k head per group of H // G value heads); v [B, S, H, V]; forget gate
    f [B, S, H] in (0, 1); W [H, V, V]; optional initial state h0 [B, H, K, V]; optional seq_idx
    [B, S] (int), where a change of value starts a new document and resets the state.
    Returns y [B, S, H, V] in v's dtype and the final state [B, H, K, V] in float32.
    """
    dims = check_scan_inputs(q, k, v, f, w, h0, seq_idx)
    if resolve_path(path, v.device) == "reference":
        return m2rnn_scan_reference(q, k, v, f, w, h0, seq_idx)
    return _M2RNNScan.apply(q, k, v, f, w, h0, seq_idx, dims, config or M2RNNKernelConfig())

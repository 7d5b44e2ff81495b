"""Triton backward of the M2RNN scan: chunks in reverse, each recomputed from its forward checkpoint.

One program per (batch, value head, block of state rows), as in the forward. For each chunk, from
last to first, the program recomputes the chunk's states from its checkpoint into a private scratch
(chunk x rows x V, float32; it stays in L2), then walks the chunk backwards carrying dL/dh:

    u = tanh(z_t),  dZ = G (1 - f_t) (1 - u^2),  G_{t-1} = f_t G + dZ W^T   (zero at a document start)
    dW += h_{t-1}^T dZ,  dk_t = dZ v_t,  dv_t = dZ^T k_t,  df_t = <G, h_{t-1} - u>,  dq_t = h_t dy_t

with G = dL/dh_t after adding q_t dy_t^T. dq and dk are summed over the value heads that share the
q/k head with float32 atomics; dv, df and dW are written per row block and summed afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nam_mixers.ops.m2rnn.config import PassConfig
from nam_mixers.ops.m2rnn.forward import tanh_f32
from nam_mixers.ops.m2rnn.shapes import ScanDims


@triton.jit
def _m2rnn_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    f_ptr,
    w_ptr,
    seq_ptr,
    ckpt_ptr,
    dy_ptr,
    dht_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    df_ptr,
    dw_ptr,
    dh0_ptr,
    scratch_ptr,
    B,
    S,
    NC,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    PRECISION: tl.constexpr,
    FAST_TANH: tl.constexpr,
):
    kb = tl.program_id(0)
    nk = tl.num_programs(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    hh = bh % H
    g = hh // (H // G)
    rows = kb * BK + tl.arange(0, BK)
    cols = tl.arange(0, BV)
    rmask = rows < K
    cmask = cols < V
    smask = rmask[:, None] & cmask[None, :]
    state_off = rows[:, None] * V + cols[None, :]
    wmask = cmask[:, None] & cmask[None, :]
    w = tl.load(w_ptr + hh * V * V + cols[:, None] * V + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
    wt = tl.trans(w)
    if HAS_DHT:
        gh = tl.load(dht_ptr + bh * K * V + state_off, mask=smask, other=0.0).to(tl.float32)
    else:
        gh = tl.zeros([BK, BV], dtype=tl.float32)
    dw = tl.zeros([BV, BV], dtype=tl.float32)

    qk_base = (b * S * G + g) * K
    v_base = (b * S * H + hh) * V
    f_base = b * S * H + hh
    part_base = (kb * B + b) * S * H + hh  # [row block, B, S, H] index of (t = 0)
    scratch = scratch_ptr + (bh * nk + kb) * CHUNK * BK * BV + tl.arange(0, BK)[:, None] * BV + cols[None, :]
    for cr in range(0, NC):
        c = NC - 1 - cr
        t_start = c * CHUNK
        t_end = tl.minimum(t_start + CHUNK, S)
        # Recompute: scratch[i] = the state entering step t_start + i (after any document reset).
        h = tl.load(ckpt_ptr + (bh * NC + c) * K * V + state_off, mask=smask, other=0.0)
        prev = tl.load(seq_ptr + b * S + tl.maximum(t_start - 1, 0)) if HAS_SEQ else 0
        for t0 in range(t_start, t_end, BLOCK_T):
            for i in tl.static_range(BLOCK_T):
                t = t0 + i
                live = t < S
                kt = tl.load(k_ptr + qk_base + t * G * K + rows, mask=rmask & live, other=0.0).to(tl.float32)
                vt = tl.load(v_ptr + v_base + t * H * V + cols, mask=cmask & live, other=0.0).to(tl.float32)
                ft = tl.load(f_ptr + f_base + t * H, mask=live, other=1.0).to(tl.float32)
                if HAS_SEQ:
                    st = tl.load(seq_ptr + b * S + t, mask=live, other=0)
                    h = tl.where(live & (st != prev), 0.0, h)
                    prev = tl.where(live, st, prev)
                tl.store(scratch + (t - t_start) * BK * BV, h)
                z = tl.dot(h, w, acc=kt[:, None] * vt[None, :], input_precision=PRECISION)
                h = h + (1.0 - ft) * (tanh_f32(z, FAST_TANH) - h)
        # Walk the chunk backwards; steps past S have f = 1 and dy = 0, which leave G unchanged.
        nb = tl.cdiv(t_end - t_start, BLOCK_T)
        for jb in range(0, nb):
            t0 = t_start + (nb - 1 - jb) * BLOCK_T
            for i in tl.static_range(BLOCK_T):
                t = t0 + BLOCK_T - 1 - i
                live = t < S
                hp = tl.load(scratch + (t - t_start) * BK * BV)
                kt = tl.load(k_ptr + qk_base + t * G * K + rows, mask=rmask & live, other=0.0).to(tl.float32)
                qt = tl.load(q_ptr + qk_base + t * G * K + rows, mask=rmask & live, other=0.0).to(tl.float32)
                vt = tl.load(v_ptr + v_base + t * H * V + cols, mask=cmask & live, other=0.0).to(tl.float32)
                dyt = tl.load(dy_ptr + v_base + t * H * V + cols, mask=cmask & live, other=0.0).to(tl.float32)
                ft = tl.load(f_ptr + f_base + t * H, mask=live, other=1.0).to(tl.float32)
                z = tl.dot(hp, w, acc=kt[:, None] * vt[None, :], input_precision=PRECISION)
                u = tanh_f32(z, FAST_TANH)
                gh += qt[:, None] * dyt[None, :]
                dqt = tl.sum((hp + (1.0 - ft) * (u - hp)) * dyt[None, :], axis=1)
                tl.atomic_add(dq_ptr + qk_base + t * G * K + rows, dqt, mask=rmask & live, sem="relaxed")
                tl.store(df_ptr + part_base + t * H, tl.sum(gh * (hp - u)), mask=live)
                dz = gh * ((1.0 - ft) * (1.0 - u * u))
                dw = tl.dot(tl.trans(hp), dz, acc=dw, input_precision=PRECISION)
                dkt = tl.sum(dz * vt[None, :], axis=1)
                tl.atomic_add(dk_ptr + qk_base + t * G * K + rows, dkt, mask=rmask & live, sem="relaxed")
                dvt = tl.sum(dz * kt[:, None], axis=0)
                tl.store(dv_ptr + part_base * V + t * H * V + cols, dvt, mask=cmask & live)
                gh = tl.dot(dz, wt, acc=ft * gh, input_precision=PRECISION)
                if HAS_SEQ:
                    st = tl.load(seq_ptr + b * S + t, mask=live, other=0)
                    sp = tl.load(seq_ptr + b * S + t - 1, mask=live & (t > 0), other=0)
                    gh = tl.where(live & (t > 0) & (st != sp), 0.0, gh)
    if HAS_H0:
        tl.store(dh0_ptr + bh * K * V + state_off, gh, mask=smask)
    tl.store(dw_ptr + ((kb * B + b) * H + hh) * V * V + cols[:, None] * V + cols[None, :], dw, mask=wmask)


def m2rnn_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    w: torch.Tensor,
    seq_idx: torch.Tensor | None,
    ckpt: torch.Tensor,
    dy: torch.Tensor,
    dht: torch.Tensor | None,
    has_h0: bool,
    dims: ScanDims,
    cfg: PassConfig,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Contiguous inputs in; returns float32 dq, dk [B, S, G, K], dv [B, S, H, V], df [B, S, H],
    dW [H, V, V] and dh0 [B, H, K, V] (None without an initial state)."""
    d = dims
    nk = triton.cdiv(d.k, cfg.block_k)
    nc = ckpt.shape[2]
    if nc != triton.cdiv(d.seq, chunk):
        raise ValueError(f"m2rnn backward: {nc} checkpoints do not match chunk {chunk} at sequence {d.seq}")
    bv = max(16, triton.next_power_of_2(d.v))
    dev = v.device
    f32 = torch.float32
    dq = torch.zeros(d.batch, d.seq, d.qk_heads, d.k, device=dev, dtype=f32)
    dk = torch.zeros_like(dq)
    dv = torch.empty(nk, d.batch, d.seq, d.heads, d.v, device=dev, dtype=f32)
    df = torch.empty(nk, d.batch, d.seq, d.heads, device=dev, dtype=f32)
    dw = torch.empty(nk, d.batch, d.heads, d.v, d.v, device=dev, dtype=f32)
    dh0 = torch.empty(d.batch, d.heads, d.k, d.v, device=dev, dtype=f32) if has_h0 else None
    scratch = torch.empty(d.batch * d.heads * nk, chunk, cfg.block_k, bv, device=dev, dtype=f32)
    _m2rnn_bwd_kernel[(nk, d.batch * d.heads)](
        q,
        k,
        v,
        f,
        w,
        seq_idx,
        ckpt,
        dy,
        dht,
        dq,
        dk,
        dv,
        df,
        dw,
        dh0,
        scratch,
        d.batch,
        d.seq,
        nc,
        H=d.heads,
        G=d.qk_heads,
        K=d.k,
        V=d.v,
        BK=cfg.block_k,
        BV=bv,
        BLOCK_T=cfg.block_t,
        CHUNK=chunk,
        HAS_DHT=dht is not None,
        HAS_H0=has_h0,
        HAS_SEQ=seq_idx is not None,
        PRECISION=cfg.dot_precision(v.dtype == torch.float32),
        FAST_TANH=cfg.use_fast_tanh(v.dtype == torch.float32, v.is_cuda),
        num_warps=cfg.num_warps,
    )
    return dq, dk, dv.sum(0), df.sum(0), dw.sum((0, 1)), dh0

"""Triton backward of the M2RNN scan: chunks in reverse, each recomputed from its forward checkpoint.

One program per (batch, value head, block of state rows), as in the forward. For each chunk, from
last to first, the program recomputes the chunk's states from its checkpoint into a private scratch
(chunk x rows x V, float32; it stays in L2), then walks the chunk backwards carrying dL/dh:

    u = tanh(z_t),  dZ = G (1 - f_t) (1 - u^2),  G_{t-1} = f_t G + dZ W^T   (zero at a document start)
    dW += h_{t-1}^T dZ,  dk_t = dZ v_t,  dv_t = dZ^T k_t,  df_t = <G, h_{t-1} - u>,  dq_t = h_t dy_t

with G = dL/dh_t after adding q_t dy_t^T. dq and dk are summed over the value heads that share the
q/k head either with float32 atomics (dqk="atomic") or by writing them per value head and summing
afterwards (dqk="per_head": deterministic, B*S*H*K*8 bytes more); dv, df and dW are written per row
block and summed afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nam_mixers.ops.m2rnn.config import PassConfig
from nam_mixers.ops.m2rnn.forward import _block_tile, _gate_tile, _reset_tile, _step, matmul, tanh_f32
from nam_mixers.ops.m2rnn.shapes import ScanDims


@triton.jit
def _walk_step(hp, kt, qt, vt, dyt, ft, gh, dw, w, wt, PRECISION: tl.constexpr, FAST_TANH: tl.constexpr):
    """One reverse step from the state entering it (hp) and dL/dh_t (gh, before adding q_t dy_t^T).
    Returns dL/dh_{t-1} (before any document reset), dW so far, and dq_t, dk_t, dv_t, df_t."""
    z = matmul(hp, w, kt[:, None] * vt[None, :], PRECISION)
    u = tanh_f32(z, FAST_TANH)
    gh = gh + qt[:, None] * dyt[None, :]
    dqt = tl.sum((hp + (1.0 - ft) * (u - hp)) * dyt[None, :], axis=1)
    dft = tl.sum(gh * (hp - u))
    dz = gh * ((1.0 - ft) * (1.0 - u * u))
    dw = matmul(tl.trans(hp), dz, dw, PRECISION)
    dkt = tl.sum(dz * vt[None, :], axis=1)
    dvt = tl.sum(dz * kt[:, None], axis=0)
    return matmul(dz, wt, ft * gh, PRECISION), dw, dqt, dkt, dvt, dft


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
    BLOCK_T_P2: tl.constexpr,
    CHUNK: tl.constexpr,
    PREFETCH: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    ATOMIC_DQK: tl.constexpr,
    PRECISION: tl.constexpr,
    FAST_TANH: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # heads of one batch row are neighbours: they share q/k in L2
    kb = tl.program_id(1)
    nk = tl.num_programs(1)
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
    # dq, dk: [B, S, G, K] summed by atomics, or [B, S, H, K] per value head, summed afterwards.
    dqk_base = qk_base if ATOMIC_DQK else (b * S * H + hh) * K
    DQK_STEP: tl.constexpr = G * K if ATOMIC_DQK else H * K
    scratch = scratch_ptr + (bh * nk + kb) * CHUNK * BK * BV + tl.arange(0, BK)[:, None] * BV + cols[None, :]
    for cr in range(0, NC):
        c = NC - 1 - cr
        t_start = c * CHUNK
        t_end = tl.minimum(t_start + CHUNK, S)
        # Recompute: scratch[i] = the state entering step t_start + i (after any document reset).
        h = tl.load(ckpt_ptr + (bh * NC + c) * K * V + state_off, mask=smask, other=0.0)
        if PREFETCH:
            # As the forward's prefetch: every input of a block is loaded as a tile one block ahead
            # and the per-step outputs are stored once per block, so no load waits behind a store.
            tb = tl.arange(0, BLOCK_T_P2)
            kn = _block_tile(k_ptr + qk_base, G * K, t_start, S, tb, rows, rmask, BLOCK_T)
            vn = _block_tile(v_ptr + v_base, H * V, t_start, S, tb, cols, cmask, BLOCK_T)
            fn = _gate_tile(f_ptr + f_base, H, t_start, S, tb, BLOCK_T)
            rn = _reset_tile(seq_ptr + b * S, t_start, S, tb, BLOCK_T) if HAS_SEQ else tb * 0
            for t0 in range(t_start, t_end, BLOCK_T):
                kc, vc, fc, rc = kn, vn, fn, rn
                kn = _block_tile(k_ptr + qk_base, G * K, t0 + BLOCK_T, S, tb, rows, rmask, BLOCK_T)
                vn = _block_tile(v_ptr + v_base, H * V, t0 + BLOCK_T, S, tb, cols, cmask, BLOCK_T)
                fn = _gate_tile(f_ptr + f_base, H, t0 + BLOCK_T, S, tb, BLOCK_T)
                rn = _reset_tile(seq_ptr + b * S, t0 + BLOCK_T, S, tb, BLOCK_T) if HAS_SEQ else tb * 0
                for i in tl.static_range(BLOCK_T):
                    sel = (tb == i)[:, None]
                    if HAS_SEQ:
                        h = tl.where(tl.sum(tl.where(tb == i, rc, 0)) != 0, 0.0, h)
                    tl.store(scratch + (t0 + i - t_start) * BK * BV, h)
                    kt = tl.sum(tl.where(sel, kc, 0.0), axis=0)
                    vt = tl.sum(tl.where(sel, vc, 0.0), axis=0)
                    h = _step(h, w, kt, vt, tl.sum(tl.where(tb == i, fc, 0.0)), PRECISION, FAST_TANH)
            tl.debug_barrier()
            # Walk the chunk's blocks backwards; the tiles of the block before are loaded ahead.
            nb = tl.cdiv(t_end - t_start, BLOCK_T)
            scratch_tile = (
                scratch_ptr
                + (bh * nk + kb) * CHUNK * BK * BV
                + tl.arange(0, BK)[None, :, None] * BV
                + cols[None, None, :]
            )
            t0 = t_start + (nb - 1) * BLOCK_T
            kn = _block_tile(k_ptr + qk_base, G * K, t0, S, tb, rows, rmask, BLOCK_T)
            qn = _block_tile(q_ptr + qk_base, G * K, t0, S, tb, rows, rmask, BLOCK_T)
            vn = _block_tile(v_ptr + v_base, H * V, t0, S, tb, cols, cmask, BLOCK_T)
            dyn = _block_tile(dy_ptr + v_base, H * V, t0, S, tb, cols, cmask, BLOCK_T)
            fn = _gate_tile(f_ptr + f_base, H, t0, S, tb, BLOCK_T)
            rn = _reset_tile(seq_ptr + b * S, t0, S, tb, BLOCK_T) if HAS_SEQ else tb * 0
            hn = tl.load(
                scratch_tile + (t0 - t_start + tb)[:, None, None] * BK * BV,
                mask=(tb < BLOCK_T)[:, None, None],
                other=0.0,
            )
            for jb in range(0, nb):
                t0 = t_start + (nb - 1 - jb) * BLOCK_T
                kc, qc, vc, dyc, fc, rc, hc = kn, qn, vn, dyn, fn, rn, hn
                tp = t0 - BLOCK_T  # the block before; inside this chunk unless jb is the last
                kn = _block_tile(k_ptr + qk_base, G * K, tp, S, tb, rows, rmask, BLOCK_T)
                qn = _block_tile(q_ptr + qk_base, G * K, tp, S, tb, rows, rmask, BLOCK_T)
                vn = _block_tile(v_ptr + v_base, H * V, tp, S, tb, cols, cmask, BLOCK_T)
                dyn = _block_tile(dy_ptr + v_base, H * V, tp, S, tb, cols, cmask, BLOCK_T)
                fn = _gate_tile(f_ptr + f_base, H, tp, S, tb, BLOCK_T)
                rn = _reset_tile(seq_ptr + b * S, tp, S, tb, BLOCK_T) if HAS_SEQ else tb * 0
                hmask = ((tb < BLOCK_T) & (tp + tb >= t_start))[:, None, None]
                hn = tl.load(
                    scratch_tile + (tp - t_start + tb)[:, None, None] * BK * BV, mask=hmask, other=0.0
                )
                dqb = tl.zeros([BLOCK_T_P2, BK], dtype=tl.float32)
                dkb = tl.zeros([BLOCK_T_P2, BK], dtype=tl.float32)
                dvb = tl.zeros([BLOCK_T_P2, BV], dtype=tl.float32)
                dfb = tl.zeros([BLOCK_T_P2], dtype=tl.float32)
                for i in tl.static_range(BLOCK_T):
                    j = BLOCK_T - 1 - i
                    sel = (tb == j)[:, None]
                    hp = tl.sum(tl.where(sel[:, :, None], hc, 0.0), axis=0)
                    kt = tl.sum(tl.where(sel, kc, 0.0), axis=0)
                    qt = tl.sum(tl.where(sel, qc, 0.0), axis=0)
                    vt = tl.sum(tl.where(sel, vc, 0.0), axis=0)
                    dyt = tl.sum(tl.where(sel, dyc, 0.0), axis=0)
                    ft = tl.sum(tl.where(tb == j, fc, 0.0))
                    gh, dw, dqt, dkt, dvt, dft = _walk_step(
                        hp, kt, qt, vt, dyt, ft, gh, dw, w, wt, PRECISION, FAST_TANH
                    )
                    dqb = tl.where(sel, dqt[None, :], dqb)
                    dkb = tl.where(sel, dkt[None, :], dkb)
                    dvb = tl.where(sel, dvt[None, :], dvb)
                    dfb = tl.where(tb == j, dft, dfb)
                    if HAS_SEQ:
                        gh = tl.where(tl.sum(tl.where(tb == j, rc, 0)) != 0, 0.0, gh)
                tt = t0 + tb
                tlive = (tb < BLOCK_T) & (tt < S)
                qk_off = dqk_base + tt[:, None] * DQK_STEP + rows[None, :]
                qk_mask = tlive[:, None] & rmask[None, :]
                if ATOMIC_DQK:
                    tl.atomic_add(dq_ptr + qk_off, dqb, mask=qk_mask, sem="relaxed")
                    tl.atomic_add(dk_ptr + qk_off, dkb, mask=qk_mask, sem="relaxed")
                else:
                    tl.store(dq_ptr + qk_off, dqb, mask=qk_mask)
                    tl.store(dk_ptr + qk_off, dkb, mask=qk_mask)
                tl.store(df_ptr + part_base + tt * H, dfb, mask=tlive)
                tl.store(
                    dv_ptr + part_base * V + tt[:, None] * (H * V) + cols[None, :],
                    dvb,
                    mask=tlive[:, None] & cmask[None, :],
                )
        else:
            prev = tl.load(seq_ptr + b * S + tl.maximum(t_start - 1, 0)) if HAS_SEQ else 0
            for t0 in range(t_start, t_end, BLOCK_T):
                for i in tl.static_range(BLOCK_T):
                    t = t0 + i
                    live = t < S
                    kt = tl.load(k_ptr + qk_base + t * G * K + rows, mask=rmask & live, other=0.0).to(
                        tl.float32
                    )
                    vt = tl.load(v_ptr + v_base + t * H * V + cols, mask=cmask & live, other=0.0).to(
                        tl.float32
                    )
                    ft = tl.load(f_ptr + f_base + t * H, mask=live, other=1.0).to(tl.float32)
                    if HAS_SEQ:
                        st = tl.load(seq_ptr + b * S + t, mask=live, other=0)
                        h = tl.where(live & (st != prev), 0.0, h)
                        prev = tl.where(live, st, prev)
                    tl.store(scratch + (t - t_start) * BK * BV, h)
                    h = _step(h, w, kt, vt, ft, PRECISION, FAST_TANH)
            # The walk reads scratch entries other threads wrote (the loads need not use the store's layout).
            tl.debug_barrier()
            # Walk the chunk backwards; steps past S have f = 1 and dy = 0, which leave G unchanged.
            nb = tl.cdiv(t_end - t_start, BLOCK_T)
            for jb in range(0, nb):
                t0 = t_start + (nb - 1 - jb) * BLOCK_T
                for i in tl.static_range(BLOCK_T):
                    t = t0 + BLOCK_T - 1 - i
                    live = t < S
                    hp = tl.load(scratch + (t - t_start) * BK * BV)
                    kt = tl.load(k_ptr + qk_base + t * G * K + rows, mask=rmask & live, other=0.0).to(
                        tl.float32
                    )
                    qt = tl.load(q_ptr + qk_base + t * G * K + rows, mask=rmask & live, other=0.0).to(
                        tl.float32
                    )
                    vt = tl.load(v_ptr + v_base + t * H * V + cols, mask=cmask & live, other=0.0).to(
                        tl.float32
                    )
                    dyt = tl.load(dy_ptr + v_base + t * H * V + cols, mask=cmask & live, other=0.0).to(
                        tl.float32
                    )
                    ft = tl.load(f_ptr + f_base + t * H, mask=live, other=1.0).to(tl.float32)
                    gh, dw, dqt, dkt, dvt, dft = _walk_step(
                        hp, kt, qt, vt, dyt, ft, gh, dw, w, wt, PRECISION, FAST_TANH
                    )
                    if ATOMIC_DQK:
                        tl.atomic_add(
                            dq_ptr + dqk_base + t * DQK_STEP + rows, dqt, mask=rmask & live, sem="relaxed"
                        )
                        tl.atomic_add(
                            dk_ptr + dqk_base + t * DQK_STEP + rows, dkt, mask=rmask & live, sem="relaxed"
                        )
                    else:
                        tl.store(dq_ptr + dqk_base + t * DQK_STEP + rows, dqt, mask=rmask & live)
                        tl.store(dk_ptr + dqk_base + t * DQK_STEP + rows, dkt, mask=rmask & live)
                    tl.store(df_ptr + part_base + t * H, dft, mask=live)
                    tl.store(dv_ptr + part_base * V + t * H * V + cols, dvt, mask=cmask & live)
                    if HAS_SEQ:
                        st = tl.load(seq_ptr + b * S + t, mask=live, other=0)
                        sp = tl.load(seq_ptr + b * S + t - 1, mask=live & (t > 0), other=0)
                        gh = tl.where(live & (t > 0) & (st != sp), 0.0, gh)
        tl.debug_barrier()  # every thread is done reading the scratch before the next chunk overwrites it
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
    dqk: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Contiguous inputs in; returns float32 dq, dk [B, S, G, K], dv [B, S, H, V], df [B, S, H],
    dW [H, V, V] and dh0 [B, H, K, V] (None without an initial state)."""
    d = dims
    dev = v.device
    bk = cfg.block_k
    nk = triton.cdiv(d.k, bk)
    nc = ckpt.shape[2]
    if chunk % cfg.block_t:
        raise ValueError(f"m2rnn backward: chunk ({chunk}) must be a multiple of block_t ({cfg.block_t})")
    if nc != triton.cdiv(d.seq, chunk):
        raise ValueError(f"m2rnn backward: {nc} checkpoints do not match chunk {chunk} at sequence {d.seq}")
    bv = max(16, triton.next_power_of_2(d.v))
    f32 = torch.float32
    if dqk == "atomic":
        dq = torch.zeros(d.batch, d.seq, d.qk_heads, d.k, device=dev, dtype=f32)
    else:
        dq = torch.empty(d.batch, d.seq, d.heads, d.k, device=dev, dtype=f32)
    dk = torch.zeros_like(dq) if dqk == "atomic" else torch.empty_like(dq)
    dv = torch.empty(nk, d.batch, d.seq, d.heads, d.v, device=dev, dtype=f32)
    df = torch.empty(nk, d.batch, d.seq, d.heads, device=dev, dtype=f32)
    dw = torch.empty(nk, d.batch, d.heads, d.v, d.v, device=dev, dtype=f32)
    dh0 = torch.empty(d.batch, d.heads, d.k, d.v, device=dev, dtype=f32) if has_h0 else None
    scratch = torch.empty(d.batch * d.heads * nk, chunk, bk, bv, device=dev, dtype=f32)
    _m2rnn_bwd_kernel[(d.batch * d.heads, nk)](
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
        BK=bk,
        BV=bv,
        BLOCK_T=cfg.block_t,
        BLOCK_T_P2=triton.next_power_of_2(cfg.block_t),
        CHUNK=chunk,
        PREFETCH=cfg.prefetch,
        HAS_DHT=dht is not None,
        HAS_H0=has_h0,
        HAS_SEQ=seq_idx is not None,
        ATOMIC_DQK=dqk == "atomic",
        PRECISION=cfg.dot_precision(v.dtype == torch.float32, v.is_cuda),
        FAST_TANH=cfg.use_fast_tanh(v.dtype == torch.float32, v.is_cuda),
        num_warps=cfg.num_warps,
    )
    if dqk != "atomic":
        per_group = (d.batch, d.seq, d.qk_heads, d.heads // d.qk_heads, d.k)
        dq, dk = dq.view(per_group).sum(3), dk.view(per_group).sum(3)
    return dq, dk, dv.sum(0), df.sum(0), dw.sum((0, 1)), dh0

"""Triton forward of the M2RNN scan: one program per (batch, value head, block of state rows).

Rows of the state are independent given W, so a program walks time holding its rows of h and all
of W in registers. Each unrolled block of BLOCK_T steps has no dependence between its loads and
the recurrence, so the compiler issues the loads ahead of the chain. The state is stored every
CHUNK steps for the backward; y is written per row block and summed over row blocks afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nam_mixers.ops.m2rnn.config import PassConfig
from nam_mixers.ops.m2rnn.shapes import ScanDims


@triton.jit
def tanh_f32(z, FAST: tl.constexpr):
    if FAST:
        # One SFU instruction (relative error 2^-11, finer than bf16's 2^-8) instead of ~12.
        u = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        # 1 - 2 / (e^{2z} + 1): saturates to +-1 without inf/inf; absolute error ~1e-7 near 0.
        u = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    return u


@triton.jit
def matmul(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b for float32 a, b. "bf16" rounds both to bfloat16 (one tensor-core pass; a 16-bit
    accumulator can become the next product's left operand without leaving registers). With a
    dimension under 16 (block_k < 16), where tl.dot does not go, a float32 multiply summed over the
    inner dimension on CUDA cores; PRECISION does not apply there."""
    if a.shape[0] >= 16 and a.shape[1] >= 16 and b.shape[1] >= 16:
        if PRECISION == "bf16":
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc=acc)
        else:
            out = tl.dot(a, b, acc=acc, input_precision=PRECISION)
    else:
        # Summed over the leading axis, not as sum(a[:, :, None] * b[None, :, :], 1): Triton's combine
        # pass rewrites that form into a tf32 tl.dot when both outer dimensions are >= 16 (dW's
        # 16 x block_k x 16), whatever PRECISION asks, and it compiles to ~2x the FMAs (sm_90 PTX).
        out = acc + tl.sum(tl.trans(a)[:, :, None] * b[:, None, :], axis=0)
    return out


@triton.jit
def _step(h, w, kt, vt, ft, PRECISION: tl.constexpr, FAST_TANH: tl.constexpr):
    """One step of the recurrence for a block of state rows: h <- f h + (1 - f) tanh(h W + k v^T)."""
    z = matmul(h, w, kt[:, None] * vt[None, :], PRECISION)
    return h + (1.0 - ft) * (tanh_f32(z, FAST_TANH) - h)


@triton.jit
def _block_tile(ptr, stride, t0, S, tb, idx, imask, BLOCK_T: tl.constexpr):
    """[BLOCK_T_P2, len(idx)] float32 tile of steps t0 + tb (zero past S); rows past BLOCK_T are unused."""
    t = t0 + tb
    mask = ((tb < BLOCK_T) & (t >= 0) & (t < S))[:, None] & imask[None, :]
    return tl.load(ptr + t[:, None] * stride + idx[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gate_tile(ptr, stride, t0, S, tb, BLOCK_T: tl.constexpr):
    """[BLOCK_T_P2] forget gates of steps t0 + tb; 1 (state unchanged) outside [0, S)."""
    t = t0 + tb
    return tl.load(ptr + t * stride, mask=(tb < BLOCK_T) & (t >= 0) & (t < S), other=1.0).to(tl.float32)


@triton.jit
def _reset_tile(seq_row, t0, S, tb, BLOCK_T: tl.constexpr):
    """[BLOCK_T_P2] int32, 1 where step t0 + tb starts a document (seq_idx changes from step t - 1)."""
    t = t0 + tb
    m = (tb < BLOCK_T) & (t > 0) & (t < S)
    return (tl.load(seq_row + t, mask=m, other=0) != tl.load(seq_row + t - 1, mask=m, other=0)).to(tl.int32)


@triton.jit
def _m2rnn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    f_ptr,
    w_ptr,
    h0_ptr,
    seq_ptr,
    y_ptr,
    ht_ptr,
    ckpt_ptr,
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
    HAS_H0: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    PRECISION: tl.constexpr,
    FAST_TANH: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # heads of one batch row are neighbours: they share q/k in L2
    kb = tl.program_id(1)
    b = bh // H
    hh = bh % H
    g = hh // (H // G)
    rows = kb * BK + tl.arange(0, BK)
    cols = tl.arange(0, BV)
    rmask = rows < K
    cmask = cols < V
    smask = rmask[:, None] & cmask[None, :]
    state_off = rows[:, None] * V + cols[None, :]
    # Padded rows and columns stay exactly zero: their k, v and W entries load as zero.
    w = tl.load(
        w_ptr + hh * V * V + cols[:, None] * V + cols[None, :],
        mask=cmask[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + bh * K * V + state_off, mask=smask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BK, BV], dtype=tl.float32)

    qk_base = (b * S * G + g) * K
    v_base = (b * S * H + hh) * V
    f_base = b * S * H + hh
    y_base = ((kb * B + b) * S * H + hh) * V
    if PREFETCH:
        # k, q, v, f and the document starts of a block are loaded as tiles one block ahead, and y is
        # stored per block: no global load waits behind a store inside the step chain (the compiler
        # cannot move a load above a store it cannot prove disjoint), so load latency is hidden.
        tb = tl.arange(0, BLOCK_T_P2)
        kn = _block_tile(k_ptr + qk_base, G * K, 0, S, tb, rows, rmask, BLOCK_T)
        qn = _block_tile(q_ptr + qk_base, G * K, 0, S, tb, rows, rmask, BLOCK_T)
        vn = _block_tile(v_ptr + v_base, H * V, 0, S, tb, cols, cmask, BLOCK_T)
        fn = _gate_tile(f_ptr + f_base, H, 0, S, tb, BLOCK_T)
        rn = _reset_tile(seq_ptr + b * S, 0, S, tb, BLOCK_T) if HAS_SEQ else tb * 0
        for t0 in range(0, S, BLOCK_T):
            if t0 % CHUNK == 0:
                tl.store(ckpt_ptr + (bh * NC + t0 // CHUNK) * K * V + state_off, h, mask=smask)
            kc, qc, vc, fc, rc = kn, qn, vn, fn, rn
            kn = _block_tile(k_ptr + qk_base, G * K, t0 + BLOCK_T, S, tb, rows, rmask, BLOCK_T)
            qn = _block_tile(q_ptr + qk_base, G * K, t0 + BLOCK_T, S, tb, rows, rmask, BLOCK_T)
            vn = _block_tile(v_ptr + v_base, H * V, t0 + BLOCK_T, S, tb, cols, cmask, BLOCK_T)
            fn = _gate_tile(f_ptr + f_base, H, t0 + BLOCK_T, S, tb, BLOCK_T)
            rn = _reset_tile(seq_ptr + b * S, t0 + BLOCK_T, S, tb, BLOCK_T) if HAS_SEQ else tb * 0
            yb = tl.zeros([BLOCK_T_P2, BV], dtype=tl.float32)
            for i in tl.static_range(BLOCK_T):
                sel = (tb == i)[:, None]
                kt = tl.sum(tl.where(sel, kc, 0.0), axis=0)
                qt = tl.sum(tl.where(sel, qc, 0.0), axis=0)
                vt = tl.sum(tl.where(sel, vc, 0.0), axis=0)
                ft = tl.sum(tl.where(tb == i, fc, 0.0))
                if HAS_SEQ:
                    h = tl.where(tl.sum(tl.where(tb == i, rc, 0)) != 0, 0.0, h)
                h = _step(h, w, kt, vt, ft, PRECISION, FAST_TANH)
                yb = tl.where(sel, tl.sum(qt[:, None] * h, axis=0)[None, :], yb)
            tt = t0 + tb
            ymask = ((tb < BLOCK_T) & (tt < S))[:, None] & cmask[None, :]
            tl.store(y_ptr + y_base + tt[:, None] * (H * V) + cols[None, :], yb, mask=ymask)
    else:
        prev = tl.load(seq_ptr + b * S) if HAS_SEQ else 0
        for c in range(0, NC):
            tl.store(ckpt_ptr + (bh * NC + c) * K * V + state_off, h, mask=smask)
            for t0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, S), BLOCK_T):
                for i in tl.static_range(BLOCK_T):
                    t = t0 + i
                    live = t < S
                    kt = tl.load(k_ptr + qk_base + t * G * K + rows, mask=rmask & live, other=0.0)
                    qt = tl.load(q_ptr + qk_base + t * G * K + rows, mask=rmask & live, other=0.0)
                    vt = tl.load(v_ptr + v_base + t * H * V + cols, mask=cmask & live, other=0.0)
                    # A step past the end has f = 1, which leaves h exactly unchanged.
                    ft = tl.load(f_ptr + f_base + t * H, mask=live, other=1.0).to(tl.float32)
                    if HAS_SEQ:
                        st = tl.load(seq_ptr + b * S + t, mask=live, other=0)
                        h = tl.where(live & (st != prev), 0.0, h)
                        prev = tl.where(live, st, prev)
                    h = _step(h, w, kt.to(tl.float32), vt.to(tl.float32), ft, PRECISION, FAST_TANH)
                    yt = tl.sum(qt.to(tl.float32)[:, None] * h, axis=0)
                    tl.store(y_ptr + y_base + t * H * V + cols, yt, mask=cmask & live)
    tl.store(ht_ptr + bh * K * V + state_off, h, mask=smask)


def m2rnn_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    w: torch.Tensor,
    h0: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    dims: ScanDims,
    cfg: PassConfig,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous inputs in; returns y [B, S, H, V] (v's dtype), final state and checkpoints (float32).

    Checkpoint c holds the state before step c * chunk, shaped [B, H, ceil(S / chunk), K, V].
    """
    d = dims
    if chunk % cfg.block_t:
        raise ValueError(f"m2rnn forward: chunk ({chunk}) must be a multiple of block_t ({cfg.block_t})")
    dev = v.device
    bk = cfg.block_k
    nk = triton.cdiv(d.k, bk)
    nc = triton.cdiv(d.seq, chunk)
    y = torch.empty(nk, d.batch, d.seq, d.heads, d.v, device=dev, dtype=torch.float32)
    ht = torch.empty(d.batch, d.heads, d.k, d.v, device=dev, dtype=torch.float32)
    ckpt = torch.empty(d.batch, d.heads, nc, d.k, d.v, device=dev, dtype=torch.float32)
    _m2rnn_fwd_kernel[(d.batch * d.heads, nk)](
        q,
        k,
        v,
        f,
        w,
        h0,
        seq_idx,
        y,
        ht,
        ckpt,
        d.batch,
        d.seq,
        nc,
        H=d.heads,
        G=d.qk_heads,
        K=d.k,
        V=d.v,
        BK=bk,
        BV=max(16, triton.next_power_of_2(d.v)),
        BLOCK_T=cfg.block_t,
        BLOCK_T_P2=triton.next_power_of_2(cfg.block_t),
        CHUNK=chunk,
        PREFETCH=cfg.prefetch,
        HAS_H0=h0 is not None,
        HAS_SEQ=seq_idx is not None,
        PRECISION=cfg.dot_precision(v.dtype == torch.float32, v.is_cuda),
        FAST_TANH=cfg.use_fast_tanh(v.dtype == torch.float32, v.is_cuda),
        num_warps=cfg.num_warps,
    )
    y = y[0] if nk == 1 else y.sum(0)
    return y.to(v.dtype), ht, ckpt

"""Triton kernels for the experts' elementwise ops (references in ``reference.py``).

Weighted SwiGLU: PyTorch runs silu, two products, the cast of the fp32 routing weight's product
and, backward, six more passes and a cat of the gate and up gradients, each over the [T, F]
activations; one kernel each way reads h (and the gradient) once and writes once, with the
arithmetic in fp32 and one rounding. Pair sums: index_select writes the [T * top_k, hidden] rows
out before ``sum`` reads them back; one kernel gathers each token's top_k rows and adds them in
registers. Fixed block sizes, no autotuning: the kernels run inside CUDA graph captures, where a
tuning run cannot. Only triton.language's builtins (tl.full, tl.reduce with our own sum, the
sigmoid written out): its library functions are compiled JIT functions wherever Triton was
imported before TRITON_INTERPRET was set (nam-spec's tests, after megatron-core), and an
interpreted kernel cannot call those.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SWIGLU_ROWS, SWIGLU_COLS = 16, 256  # a program's tile of [T, F]: 4096 fp32 values, 16 per thread
PAIRS_COLS = 1024  # hidden columns per program of the pair sum


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _swiglu_fwd_kernel(h_ptr, p_ptr, y_ptr, T, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < T)[:, None] & (cols < F)[None, :]
    at = rows.to(tl.int64)[:, None] * (2 * F) + cols[None, :]
    a = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + at + F, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + rows, mask=rows < T, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * u * p[:, None]
    out = rows.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    h_ptr, p_ptr, g_ptr, dh_ptr, dp_ptr, T, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr
):
    # a program owns whole rows: the routing weight's gradient sums over all F columns
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    p = tl.load(p_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    dp = tl.full([BLOCK_T], 0.0, tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = row_ok[:, None] & (cols < F)[None, :]
        at = rows.to(tl.int64)[:, None] * (2 * F) + cols[None, :]
        at_g = rows.to(tl.int64)[:, None] * F + cols[None, :]
        a = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + at + F, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + at_g, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-a))
        silu = a * s
        gp = g * p[:, None]
        dp += tl.reduce(g * silu * u, 1, _add)
        # d silu / da = s + a s (1 - s)
        tl.store(dh_ptr + at, (gp * u * (s + silu * (1.0 - s))).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + at + F, (gp * silu).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dp_ptr + rows, dp.to(dp_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _sum_pairs_kernel(rows_ptr, inverse_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.full([BLOCK_H], 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(inverse_ptr + t * TOP_K + j).to(tl.int64)
        acc += tl.load(rows_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """h [T, 2F] and probs [T], both contiguous -> [T, F] in h's dtype."""
    t, f = h.shape[0], h.shape[1] // 2
    y = h.new_empty(t, f)
    if t:
        grid = (triton.cdiv(t, SWIGLU_ROWS), triton.cdiv(f, SWIGLU_COLS))
        _swiglu_fwd_kernel[grid](h, probs, y, t, f, BLOCK_T=SWIGLU_ROWS, BLOCK_F=SWIGLU_COLS)
    return y


def swiglu_backward(
    h: torch.Tensor, probs: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous h [T, 2F], probs [T], grad [T, F] -> (dh [T, 2F] in h's dtype, dprobs [T] in probs')."""
    t, f = h.shape[0], h.shape[1] // 2
    dh, dp = torch.empty_like(h), torch.empty_like(probs)
    if t:
        grid = (triton.cdiv(t, SWIGLU_ROWS),)
        _swiglu_bwd_kernel[grid](h, probs, grad, dh, dp, t, f, BLOCK_T=SWIGLU_ROWS, BLOCK_F=SWIGLU_COLS)
    return dh, dp


def sum_pairs(rows: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """Contiguous rows [T * top_k, H] and inverse [T * top_k] -> [T, H] in rows' dtype."""
    h = rows.shape[1]
    out = rows.new_empty(inverse.numel() // top_k, h)
    if out.shape[0]:
        grid = (out.shape[0], triton.cdiv(h, PAIRS_COLS))
        _sum_pairs_kernel[grid](rows, inverse, out, h, TOP_K=top_k, BLOCK_H=PAIRS_COLS)
    return out

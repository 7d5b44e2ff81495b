"""Polar factor by Newton-Schulz iteration, run to a tolerance, on plain or tensor-parallel shards.

The polar factor of W = U S V^T is Q = U V^T, the nearest (semi-)orthogonal matrix in Frobenius
norm. Each step maps X -> X p(X^T X) with an odd cubic p(x) = a x - c x^3 applied to the singular
values. After Frobenius normalisation the small singular values of a random matrix sit near
n^-1.5, and the classical step (a, c) = (3/2, 1/2) grows them by only 1.5x, hence ~30 steps. The
bulk steps here use, for the current singular-value interval [lo, hi], the cubic that maps it
best onto an interval around 1 (equioscillation at lo, at the cubic's peak and at hi), which
grows small singular values by ~2.6x per step and turns into the classical step as lo -> hi.
Bulk steps run in a low precision (bf16 by default); the last steps run in fp32 with TF32
disabled, and the residual max|G - I| of the returned factor is measured in fp32.

Tensor parallelism: a weight split along one dimension across ranks of ``group`` is handled by
forming the Gram matrix over the other (unsplit) dimension, summing it across ranks, and
updating each shard locally. Every rank then holds its shard of the polar factor of the gathered
weight; nothing but the Gram matrix and one squared norm crosses ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

Side = Literal["in", "out"]

# Spectrum widening that rounding may cause between steps, per precision; the cubic is designed
# for an interval this much wider, so a singular value pushed past the design bound never
# reaches the cubic's root and flips sign.
_MARGIN = {torch.bfloat16: 2e-2, torch.float32: 1e-3}


@dataclass(frozen=True)
class PolarResult:
    """The polar factor and how it was reached.

    ``residual`` holds, per matrix of the batch, max(max|G - I|, estimated ||G - I||_2) of the
    returned factor, G its Gram matrix, computed in fp32 (for a rank-deficient Gram, the
    estimated ||G^2 - G||_2).
    """

    q: torch.Tensor
    residual: torch.Tensor
    steps_low_precision: int
    steps_fp32: int
    converged: bool


def cubic_for_interval(lo: float, hi: float) -> tuple[float, float, float, float]:
    """Coefficients (a, c) of p(x) = a x - c x^3 that map [lo, hi] best onto an interval around 1.

    Returns (a, c, new_lo, new_hi): the image of [lo, hi] is [new_lo, new_hi]. With l = lo / hi
    and s = 1 + l + l^2, the equioscillating cubic on [l, 1] has a = c s and
    c = 2 / (l + l^2 + (2/3) s sqrt(s / 3)); it is rescaled to [lo, hi].
    """
    if not 0 < lo <= hi:
        raise ValueError(f"cubic_for_interval: need 0 < lo <= hi, got lo={lo}, hi={hi}")
    ratio = lo / hi
    s = 1.0 + ratio + ratio * ratio
    peak = (2.0 / 3.0) * s * math.sqrt(s / 3.0)
    c = 2.0 / (ratio + ratio * ratio + peak)
    a = c * s
    new_lo = c * (ratio + ratio * ratio)
    new_hi = c * peak
    return a / hi, c / hi**3, new_lo, new_hi


Bulk = Literal["bf16", "tf32", "fp32"]
_BULK_DTYPE = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}
_MATMUL_PRECISION = {"bf16": "highest", "tf32": "high", "fp32": "highest"}


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    # fp32 matmuls run in IEEE fp32 ("highest") or TF32 ("high") whatever the caller set.
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _gram(x: torch.Tensor, side: Side, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The fp32 Gram matrix, summed over the tensor-parallel group when sharded."""
    a, b = (x.mT, x) if side == "in" else (x, x.mT)
    if x.dtype != torch.float32:
        # bf16 x bf16 products are exact in fp32: with fp32 accumulation this Gram is as accurate
        # as an fp32 GEMM on the same values, at tensor-core speed where CUDA offers it.
        if x.is_cuda:
            g = (
                torch.bmm(a, b, out_dtype=torch.float32)
                if x.dim() == 3
                else torch.mm(a, b, out_dtype=torch.float32)
            )
        else:
            g = a.float() @ b.float()
    else:
        g = a @ b
    if group is not None:
        # The shards are split along the dimension the Gram sums over: partial Grams add up.
        dist.all_reduce(g, group=group)
    return g


def _step(x: torch.Tensor, g: torch.Tensor, a: float, c: float, side: Side) -> torch.Tensor:
    g = g.to(x.dtype)
    if side == "in":
        return (
            torch.baddbmm(x, x, g, beta=a, alpha=-c)
            if x.dim() == 3
            else torch.addmm(x, x, g, beta=a, alpha=-c)
        )
    return (
        torch.baddbmm(x, g, x, beta=a, alpha=-c) if x.dim() == 3 else torch.addmm(x, g, x, beta=a, alpha=-c)
    )


def _residual(g: torch.Tensor, rank_deficient: bool, power_steps: int = 8) -> torch.Tensor:
    """max(max|E|, power-iteration estimate of ||E||_2) per matrix, E = G - I (or G^2 - G).

    max|E| alone misses a lone unconverged singular value of a large matrix: its error spreads
    over n^2 entries as (s^2 - 1) v v^T, entries ~(s^2 - 1) / n. The power estimate catches it.
    For a rank-deficient Gram (the larger side) a converged factor gives a projection, so
    E = G^2 - G, applied as two products with G and never formed.
    """
    g = g.float()
    n = g.shape[-1]
    eye = torch.eye(n, dtype=g.dtype, device=g.device)

    def apply(v: torch.Tensor) -> torch.Tensor:
        gv = g @ v
        return g @ gv - gv if rank_deficient else gv - v

    # A fixed start vector: every tensor-parallel rank holds the same G and must agree.
    gen = torch.Generator().manual_seed(n)
    v = torch.randn(n, 1, generator=gen, dtype=g.dtype).to(g.device).expand(*g.shape[:-2], n, 1)
    estimate = torch.zeros(g.shape[:-2], dtype=g.dtype, device=g.device)
    for _ in range(power_steps):
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
        ev = apply(v)
        estimate = ev.norm(dim=(-2, -1))
        v = ev
    if rank_deficient:
        return estimate
    return torch.maximum((g - eye).abs().amax(dim=(-2, -1)), estimate)


def gaussian_lower(rows: int, cols: int) -> float:
    """sigma_min / ||W||_F of a Gaussian rows x cols matrix (Marchenko-Pastur edge, and
    1 / sqrt(n) for a square one): the default guess of the bulk schedule."""
    small, large = sorted((rows, cols))
    return max(math.sqrt(large) - math.sqrt(small), 1 / math.sqrt(small)) / math.sqrt(large * small)


def default_side(rows: int, cols: int) -> Side:
    """The cheaper Gram of an unsharded rows x cols matrix: over the smaller dimension."""
    return "in" if rows >= cols else "out"


def polar_factor(
    w: torch.Tensor,
    *,
    tol: float = 1e-3,
    max_steps: int = 40,
    bulk: Bulk = "bf16",
    bulk_tol: float = 2e-2,
    lower: float | None = None,
    side: Side | None = None,
    global_shape: tuple[int, int] | None = None,
    group: dist.ProcessGroup | None = None,
) -> PolarResult:
    """Polar factor of ``w`` ([rows, cols] or a batch [b, rows, cols]) by Newton-Schulz.

    tol: max|G - I| the result must reach (checked in fp32). max_steps: cap on all steps.
    bulk: precision of the bulk iterates ("bf16", "tf32" or "fp32"; their Grams are always
    accumulated and returned in fp32), whose steps stop once the residual is below bulk_tol or
    stops falling (the precision's floor); then classical steps in IEEE fp32 until tol.
    lower: assumed smallest singular value over the Frobenius norm, for the bulk schedule;
    default what a Gaussian matrix of this shape has (``gaussian_lower``). Too small a value
    costs schedule steps, too large one costs classical steps; neither changes the result.
    side: "in" forms X^T X (cols x cols), "out" forms X X^T (rows x rows); default the smaller.
    group / global_shape: when ``w`` is one rank's shard of a weight split across ``group``, the
    side must be the unsplit dimension ("in" for a row split, "out" for a column split) and
    global_shape the gathered [rows, cols].
    """
    if w.dim() not in (2, 3):
        raise ValueError(
            f"polar_factor: expected a [rows, cols] or [batch, rows, cols] tensor, got {tuple(w.shape)}"
        )
    if not w.is_floating_point():
        raise TypeError(f"polar_factor: expected a floating tensor, got {w.dtype}")
    if not 0 < tol < 1 or not tol <= bulk_tol:
        raise ValueError(f"polar_factor: need 0 < tol <= bulk_tol, got tol={tol}, bulk_tol={bulk_tol}")
    if bulk not in _BULK_DTYPE:
        raise ValueError(f"polar_factor: bulk must be one of {sorted(_BULK_DTYPE)}, got {bulk!r}")
    if group is not None and (side is None or global_shape is None):
        raise ValueError("polar_factor: a sharded weight (group given) needs side and global_shape")
    rows, cols = global_shape or (w.shape[-2], w.shape[-1])
    side = side or default_side(rows, cols)
    if side not in ("in", "out"):
        raise ValueError(f"polar_factor: side must be 'in' or 'out', got {side!r}")
    rank_deficient = (side == "in" and rows < cols) or (side == "out" and rows > cols)

    x = w.detach().float()
    sq = x.square().sum(dim=(-2, -1))
    if group is not None:
        dist.all_reduce(sq, group=group)
    norm = sq.sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    x = x / norm[..., None, None]

    # Bulk: the schedule follows the interval the spectrum is known to lie in.
    dtype = _BULK_DTYPE[bulk]
    margin = _MARGIN[dtype]
    x_low = x.to(dtype)
    steps_low = 0
    with _matmul_precision(_MATMUL_PRECISION[bulk]):
        g = _gram(x_low, side, group)
        # sigma_max^2 <= min(||G||_F, ||G||_inf): a tighter top than the Frobenius norm's 1, which
        # would spend the first steps only scaling the spectrum up. Same on every rank (G is).
        gf = g.float()
        top = torch.minimum(torch.linalg.matrix_norm(gf), gf.abs().sum(-1).amax(-1)).clamp_min(1e-30)
        x_low = (x_low.float() / top.sqrt()[..., None, None]).to(dtype)
        g = gf / top[..., None, None]
        lo = (lower if lower is not None else gaussian_lower(rows, cols)) / float(top.max().sqrt())
        lo, hi = min(lo, 1.0), 1.0
        previous = math.inf
        while steps_low < max_steps - 1:
            residual = _residual(g, rank_deficient).max().item()
            # Past 0.25 the classical step at least quarters the residual; when it no longer
            # halves, the low precision's floor is reached and only fp32 steps can go lower.
            if residual < bulk_tol or (residual < 0.25 and residual > 0.5 * previous):
                break
            previous = residual
            a, c, lo, hi = cubic_for_interval(lo, hi * (1 + margin))
            x_low = _step(x_low, g, a, c, side)
            steps_low += 1
            g = _gram(x_low, side, group)

    # Polish: classical steps in fp32 (at least one), each followed by the measured residual.
    steps_fp32 = 0
    with _matmul_precision("highest"):
        g = _gram(x_low, side, group)
        x = x_low.float()
        while True:
            x = _step(x, g, 1.5, 0.5, side)
            steps_fp32 += 1
            g = _gram(x, side, group)
            residual = _residual(g, rank_deficient)
            if residual.max().item() < tol or steps_low + steps_fp32 >= max_steps:
                break
    return PolarResult(x, residual, steps_low, steps_fp32, bool(residual.max().item() < tol))

"""The experts' elementwise ops at nam56r-small's shape: nam-mixers' Triton kernels
(``nam_mixers.ops.moe``, what the local backend runs on CUDA) against their PyTorch references
(what it ran before), forward+backward.

    NAM_COMMIT=<sha> bash bench/gpu.sh moe_ops

Shapes, per E layer and micro-batch of 4096 tokens (16 experts, top-4, FFN 512, hidden 2048):

- weighted SwiGLU: h [16384, 1024] bf16 (the experts' fc1 output, gate then up), fp32 routing
  weights [16384]; forward and backward with a random [16384, 512] output gradient. The
  reference runs ~4 kernels forward (silu, two products, the cast) and ~8 backward (a cat of the
  gate and up gradients among them).
- pair sums: rows [16384, 2048] bf16 (the experts' output in the expert-sorted order), a random
  permutation as the inverse, top-4 -> [4096, 2048]; the local dispatcher runs it in the combine
  forward and in the backward of its dispatch. The reference writes the gathered rows out before
  summing them.

Floors: the bytes the fused kernel must move (read h once and write y; backward read h and the
gradient, write dh; read each gathered row once and write the sums) over 4.25 TB/s, the H200's
measured device copy rate (RESULTS.md, ceilings). Checks first: each kernel against the same
computation in float64 on the same bf16 inputs (max error over max magnitude), and the reference
against it as well, so the rows show what the reference's bf16 roundings cost too. A step of
nam56r-small runs each op 22 E layers x 4 micro-batches times, the pair sum twice.
"""

from __future__ import annotations

from typing import Any

from bench.report import Report

TOKENS, TOP_K, FFN, HIDDEN = 4096, 4, 512, 2048
COPY_TBPS = 4.25  # bench/ceilings.py: device-to-device copy, H200
TOL = 1e-2  # relative to the output's magnitude: bf16 outputs rounded once (the kernels)


def _floor_ms(nbytes: int) -> float:
    return nbytes / (COPY_TBPS * 1e12) * 1e3


def _rel(a: Any, exact: Any) -> float:
    return float((a.detach().double() - exact).abs().max() / exact.abs().max())


def main(report: Report) -> None:
    import torch

    from nam_mixers.ops.moe import sum_pairs, weighted_swiglu

    gen = torch.Generator(device="cuda").manual_seed(0)
    pairs = TOKENS * TOP_K
    h = torch.randn(pairs, 2 * FFN, device="cuda", generator=gen).bfloat16()
    probs = torch.rand(pairs, device="cuda", generator=gen)
    grad = torch.randn(pairs, FFN, device="cuda", generator=gen).bfloat16()

    def swiglu(path: str, h: Any = h, probs: Any = probs, grad: Any = grad) -> list[Any]:
        h, probs = h.detach().requires_grad_(True), probs.detach().requires_grad_(True)
        y = weighted_swiglu(h, probs, path=path)
        y.backward(grad)
        return [y, h.grad, probs.grad]

    exact = swiglu("reference", h.double(), probs.double(), grad.double())
    for path in ("triton", "reference"):
        for name, a, e in zip(("output", "h grad", "probs grad"), swiglu(path), exact, strict=True):
            report.check(f"weighted SwiGLU {path} vs float64: {name}", _rel(a, e), TOL)
    elem = pairs * FFN
    # forward: read h (2 elem x 2 B) + probs, write y; backward: read h, probs, grad, write dh, dprobs
    fwd_bytes = elem * 2 * 2 + elem * 2 + pairs * 4
    bwd_bytes = elem * 2 * 2 + elem * 2 + elem * 2 * 2 + pairs * 8
    for path in ("triton", "reference"):
        report.time(
            f"weighted SwiGLU fwd+bwd [{pairs}, {2 * FFN}] bf16, {path}",
            lambda path=path: swiglu(path),
            floor_ms=_floor_ms(fwd_bytes + bwd_bytes),
        )

    rows = torch.randn(pairs, HIDDEN, device="cuda", generator=gen).bfloat16()
    inverse = torch.randperm(pairs, device="cuda", generator=gen)
    exact_sums = rows.double().index_select(0, inverse).view(TOKENS, TOP_K, HIDDEN).sum(1)
    for path in ("triton", "reference"):
        report.check(
            f"pair sums {path} vs float64", _rel(sum_pairs(rows, inverse, TOP_K, path=path), exact_sums), TOL
        )
        report.time(
            f"pair sums [{pairs}, {HIDDEN}] -> [{TOKENS}, {HIDDEN}] bf16 top-{TOP_K}, {path}",
            lambda path=path: sum_pairs(rows, inverse, TOP_K, path=path),
            floor_ms=_floor_ms(pairs * HIDDEN * 2 + TOKENS * HIDDEN * 2 + pairs * 8),
        )

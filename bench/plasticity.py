"""FIRE on every eligible logical block of a NAM56R-geometry weight set, on one GPU.

Geometry (shared/DESIGN.md): hidden 3584, 52 layers of AEMEAEMEAEMR (13 A, 22 E, 13 M, 4 R).
Eligible blocks, routers/embeddings/output layer/convolutions/recurrent W excluded:
  A: Q 3584x3584, K 512x3584, V 512x3584 (56 / 8 heads of 64), out 3584x3584
  E: per expert (16, FFN 896) gate 896x3584, up 896x3584, fc2 3584x896; shared expert (FFN 1024)
     gate, up 1024x3584, fc2 3584x1024
  M: in_proj z 7168x3584, x 7168x3584, B 512x3584, C 512x3584 (8 groups x state 64),
     dt 112x3584; out_proj 3584x7168
  R: qk_proj q 64x3584, k 64x3584; in_proj v 704x3584, g 704x3584, f 44x3584; out_proj 3584x704
Same-shape blocks of all layers run as one batch (experts included), bf16 bulk steps, fp32 last
step, tolerance 1e-3. Plain random tensors stand in for the weights (no megatron model).

Checks first: against the polar factor from an fp64 eigendecomposition on one matrix of each shape, and the residual
of every block. Floor: the executed GEMM flops, bf16 at 700 TFLOP/s (the median ceiling, bench/RESULTS.md) and IEEE
fp32 at 67 TFLOP/s (H200 datasheet, no tensor cores).
"""

from __future__ import annotations

from collections import Counter

from bench.report import Report

HIDDEN = 3584
LAYERS = {"A": 13, "E": 22, "M": 13, "R": 4}
BF16_TFLOPS, FP32_TFLOPS = 700.0, 67.0


def eligible_shapes() -> Counter[tuple[int, int]]:
    """(rows, cols) -> how many blocks of NAM56R have that shape."""
    h, shapes = HIDDEN, Counter()
    per_layer = {
        "A": [(3584, h), (512, h), (512, h), (h, 3584)],
        "E": [(896, h)] * 32 + [(h, 896)] * 16 + [(1024, h)] * 2 + [(h, 1024)],
        "M": [(7168, h), (7168, h), (512, h), (512, h), (112, h), (h, 7168)],
        "R": [(64, h), (64, h), (704, h), (704, h), (44, h), (h, 704)],
    }
    for letter, count in LAYERS.items():
        for shape in per_layer[letter]:
            shapes[shape] += count
    return shapes


def _gemm_flops(rows: int, cols: int) -> int:
    small, large = min(rows, cols), max(rows, cols)
    return 2 * large * small * small  # one Gram or one update, on the smaller side


def polar_reference(w):
    """U V^T of w = U S V^T in fp64, as W (W^T W)^(-1/2) from an eigendecomposition of the Gram."""
    import torch

    x = w.double() if w.shape[0] >= w.shape[1] else w.double().mT
    lam, v = torch.linalg.eigh(x.mT @ x)
    q = x @ (v * lam.rsqrt()) @ v.mT
    return q if w.shape[0] >= w.shape[1] else q.mT


def main(report: Report) -> None:
    import torch

    from nam_plasticity import FireConfig, fire_matrices

    torch.manual_seed(0)
    config = FireConfig(tol=1e-3, bulk="bf16")
    shapes = eligible_shapes()

    # Correctness: one fresh Gaussian matrix per shape against the SVD polar factor.
    for rows, cols in sorted(shapes):
        w = torch.randn(rows, cols, device="cuda")
        out, result = fire_matrices(w, config)
        ref = polar_reference(w) * (rows / cols) ** 0.5
        report.check(
            f"FIRE vs fp64 polar {rows}x{cols} (rel. Frobenius)", float((out - ref).norm() / ref.norm()), 3e-2
        )
        q = out.double() / (rows / cols) ** 0.5
        g = q.mT @ q if rows >= cols else q @ q.mT
        defect = torch.linalg.eigvalsh(g - torch.eye(g.shape[0], device="cuda", dtype=g.dtype)).abs().max()
        report.check(f"FIRE orthogonality {rows}x{cols} (||G-I||_2, fp64)", float(defect), 2e-3)
        del w, out, result

    # Every eligible block, same shapes batched.
    weights = {s: torch.randn(n, *s, device="cuda", dtype=torch.bfloat16) for s, n in shapes.items()}
    stats: dict[tuple[int, int], tuple[int, int, float]] = {}

    def fire_all() -> None:
        for shape, w in weights.items():
            per_batch = max(1, config.max_batch_elements // (shape[0] * shape[1]))
            for i in range(0, w.shape[0], per_batch):
                _, r = fire_matrices(w[i : i + per_batch], config)
                low, high, res = stats.get(shape, (0, 0, 0.0))
                stats[shape] = (
                    max(low, r.steps_low_precision),
                    max(high, r.steps_fp32),
                    max(res, float(r.residual.max())),
                )

    fire_all()
    worst = max(res for _, _, res in stats.values())
    report.check("FIRE residual max|G-I| over every block (tol 1e-3)", worst, config.tol)

    bf16_flops = fp32_flops = 0
    for shape, n in shapes.items():
        low, high, _ = stats[shape]
        gemm = _gemm_flops(*shape) * n
        bf16_flops += gemm * (2 * low + 1)  # bulk steps (Gram + update) and the first fp32-accurate Gram
        fp32_flops += gemm * 2 * high  # fp32 steps: update and residual Gram
    floor_ms = bf16_flops / (BF16_TFLOPS * 1e9) + fp32_flops / (FP32_TFLOPS * 1e9)
    ms = report.time(
        f"FIRE all {sum(shapes.values())} NAM56R blocks",
        fire_all,
        floor_ms=floor_ms,
        bf16_TFLOP=bf16_flops / 1e12,
        fp32_TFLOP=fp32_flops / 1e12,
    )
    report.check("FIRE all blocks under 2 s (seconds)", ms / 1e3, 2.0)
    for shape, (low, high, res) in sorted(stats.items()):
        report.row(
            f"  {shapes[shape]} x {shape[0]}x{shape[1]}", steps_bf16=low, steps_fp32=high, residual=res
        )
    weights.clear()  # free the GPU memory before the next case
    stp_overhead(report)


def stp_overhead(report: Report) -> None:
    """STP at one layer of NAM56R (seq 4096, micro-batch 1, hidden 3584, bf16): sampling on the
    CPU, the loss and its backward into the hidden states. Goal: all selected layers under 1% of
    a step (788 ms measured for megatron's baseline at this width, shared/GPU.md)."""
    import torch

    from nam_plasticity import STP, STPConfig

    hidden = torch.randn(4096, 1, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    doc_ids = (torch.arange(4096) // 512)[None]  # eight packed documents
    stp = STP(STPConfig(layers=(1,), lam=0.1, samples=64))
    stp.set_documents(doc_ids)

    def one_layer() -> None:
        stp.set_step(1)
        out = stp(1, "A", hidden)
        out.backward(torch.zeros_like(out))  # only the STP gradient flows

    ms = report.time("STP one layer fwd+bwd, 64 samples, s4096 h3584", one_layer)
    report.rows[-1].extra["pct_of_788ms_step"] = 100 * ms / 788

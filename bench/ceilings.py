"""The two ceilings every other figure is compared with: device-copy bandwidth and bf16 matmul rate."""

from __future__ import annotations

from bench.report import Report


def main(report: Report) -> None:
    import torch

    n = 2**30  # 2 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = report.time("copy 2 GiB bf16", lambda: dst.copy_(src))
    report.rows[-1].extra["TB/s"] = 2 * n * 2 / (ms * 1e-3) / 1e12

    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = report.time("matmul 8192^3 bf16", lambda: a @ b)
    report.rows[-1].extra["TFLOP/s"] = 2 * m**3 / (ms * 1e-3) / 1e12

"""M2RNN scan on one GPU at NAM56R dims: checks against the per-step reference, then a sweep of kernel
configurations (forward and backward timed separately), then forward+backward of the default and of
the best swept pair, the reference at a short sequence, and the whole mixer.

    bash bench/gpu.sh m2rnn

Floors, stated beside the rows (H200, 1.98 GHz boost clock, 4.26 TB/s measured copy bandwidth):
- chain: the 4096 steps are dependent. One step is at least a V-long dot product (log2 V = 4 dependent
  FMA levels at best, 16 cycles), a tanh (one SFU tanh.approx, ~20 cycles) and the gate's sub + FMA
  (8 cycles): ~44 cycles, ~22 ns, so ~0.09 ms forward and twice that backward (recompute + reverse
  walk). The `chain probe` row measures 4096 dependent (FMA + tanh.approx) steps with no loads.
- bytes: what must cross HBM (inputs, outputs, checkpoints) over 4.26 TB/s; ~0.02 ms, never the limit.
- fp32 FMA: with precision "ieee" the state matmuls run on CUDA cores: 2*B*H*S*K*V*V flops (forward;
  x3 backward incl. recompute) over 67 TFLOP/s.
Pin the fastest configuration that passes its check with `M2RNNKernelConfig(...)` as printed in the
`best` row (and as the default in nam_mixers/ops/m2rnn/config.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from bench.report import Report

B, S, H, K, V, G = 4, 4096, 44, 64, 16, 1
HIDDEN = 3584
CLOCK_GHZ, HBM_TBS, FP32_TFLOPS = 1.98, 4.26, 67.0
CHAIN_CYCLES = 44

# The sweep: every forward variant and every backward variant is compiled and timed once. Compile
# times (sm_90 target, measured offline on a loaded 2-core machine): forward 0.5-10 s each (block_t 32:
# 12-28 s, left out), backward 1.5-19 s (block_t 16 spills and takes 15-20 s, left out).
# bf16 training runs tf32 dots with the hardware tanh (the 16-bit default) and is swept widest; exact
# fp32 ("ieee", the float32 default) is timed at one block_t; one variant prices the accurate tanh.
SPLITS = ((64, 4), (32, 2), (16, 1))  # (block_k, num_warps)
FWD_SWEEP = (
    [(bt, bk, nw, "tf32", True) for bt, (bk, nw) in itertools.product((4, 8, 16), SPLITS)]
    + [(8, bk, nw, "ieee", False) for bk, nw in SPLITS]
    + [(16, 16, 1, "tf32", False)]
)
BWD_SWEEP = (
    [(bt, bk, nw, "tf32", True, 64) for bt, (bk, nw) in itertools.product((4, 8), SPLITS)]
    + [(4, bk, nw, "ieee", False, 64) for bk, nw in SPLITS]
    + [(4, 16, 1, "tf32", True, 32), (4, 16, 1, "tf32", True, 128), (4, 16, 1, "tf32", False, 64)]
)


def _rel(a: Any, ref: Any) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _inputs(b: int, s: int, dtype: Any, seed: int, packed: bool = True) -> dict[str, Any]:
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> Any:
        return (scale * torch.randn(*shape, device="cuda", generator=gen)).to(dtype)

    # Gate as the module makes it at init: f = exp(-softplus(x_f + dt_bias)), dt in [1e-3, 1e-1].
    dt = torch.exp(torch.empty(H, device="cuda").uniform_(-6.9, -2.3, generator=gen))
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    f = torch.exp(-torch.nn.functional.softplus(torch.randn(b, s, H, device="cuda", generator=gen) + dt_bias))
    x = {
        "q": rnd(b, s, G, K, scale=0.25),
        "k": rnd(b, s, G, K, scale=0.25),
        "v": rnd(b, s, H, V),
        "f": f,
        "w": (torch.eye(V, device="cuda") + 0.1 * torch.randn(H, V, V, device="cuda", generator=gen)).to(
            dtype
        ),
        "h0": rnd(b, H, K, V, scale=0.5).float(),
    }
    if packed:  # documents of random lengths (mean ~600 steps), one starting exactly at a chunk edge
        starts = torch.rand(b, s, device="cuda", generator=gen) < 1 / 600
        starts[:, 1024] = True
        x["seq_idx"] = torch.cumsum(starts, dim=1).to(torch.int32)
    return x


def _grads(out: tuple[Any, Any], x: dict[str, Any], dy: Any, dht: Any) -> list[Any]:
    import torch

    names = [n for n in ("q", "k", "v", "f", "w", "h0") if n in x]
    return list(
        torch.autograd.grad((out[0].float() * dy).sum() + (out[1] * dht).sum(), [x[n] for n in names])
    )


def _check_against_reference(report: Report, b: int, s: int, dtype: Any, tol_y: float, tol_g: float) -> None:
    import torch

    from nam_mixers.ops.m2rnn import m2rnn_scan, m2rnn_scan_reference

    x = _inputs(b, s, dtype, seed=s)
    for n in ("q", "k", "v", "f", "w", "h0"):
        x[n].requires_grad_()
    out = m2rnn_scan(**x, path="triton")
    ref = m2rnn_scan_reference(**x)
    dy = torch.randn_like(ref[0], dtype=torch.float32)
    dht = torch.randn_like(ref[1])
    tag = f"{str(dtype).removeprefix('torch.')} B{b} S{s} packed+h0"
    report.check(f"y {tag}", _rel(out[0], ref[0]), tol_y)
    report.check(f"h_T {tag}", _rel(out[1], ref[1]), tol_y)
    for n, got, want in zip(
        ("q", "k", "v", "f", "W", "h0"), _grads(out, x, dy, dht), _grads(ref, x, dy, dht), strict=True
    ):
        report.check(f"d{n} {tag}", _rel(got, want), tol_g)


def _safe(report: Report, case: str, fn: Callable[[], Any], **extra: Any) -> float | None:
    """Time one variant; a variant that fails to compile or run is a row saying why, not a lost sweep."""
    try:
        return report.time(case, fn, **extra)
    except Exception as e:  # e.g. out of registers or shared memory for one launch shape
        report.row(case, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}", **extra)
        return None


def _chain_probe_ms(report: Report) -> None:
    import torch
    import triton
    import triton.language as tl

    from nam_mixers.ops.m2rnn.forward import tanh_f32

    @triton.jit
    def probe(x_ptr, n_steps):
        x = tl.load(x_ptr + tl.program_id(0))
        for _ in range(n_steps):
            x = tanh_f32(x * 1.0001 + 0.5, True)
        tl.store(x_ptr + tl.program_id(0), x)

    buf = torch.rand(B * H, device="cuda")
    report.time("chain probe: 4096 dependent fma+tanh.approx", lambda: probe[(B * H,)](buf, S, num_warps=1))


def main(report: Report) -> None:
    import torch

    from nam_mixers import M2RNN
    from nam_mixers.ops.m2rnn import M2RNNKernelConfig, PassConfig, m2rnn_scan, m2rnn_scan_reference
    from nam_mixers.ops.m2rnn.backward import m2rnn_backward
    from nam_mixers.ops.m2rnn.forward import m2rnn_forward
    from nam_mixers.ops.m2rnn.shapes import check_scan_inputs

    # Correctness first: the default configuration against the reference (fp32 at a shorter sequence,
    # the per-step reference's autograd graph at B4 S4096 would need ~60 GB).
    _check_against_reference(report, 1, S, torch.bfloat16, 2e-2, 5e-2)
    _check_against_reference(report, 1, 1024, torch.float32, 1e-4, 1e-4)

    chain_ms = S * CHAIN_CYCLES / (CLOCK_GHZ * 1e6)
    x = _inputs(B, S, torch.bfloat16, seed=0)
    d = check_scan_inputs(x["q"], x["k"], x["v"], x["f"], x["w"], None, x["seq_idx"])
    args = (x["q"], x["k"], x["v"], x["f"], x["w"], None, x["seq_idx"])
    dy = torch.randn_like(x["v"])
    io_bytes = 2 * B * S * G * K * 2 + B * S * H * (V * 2 * 2 + 4)  # q, k, v, y (bf16), f (fp32)

    def ckpt_bytes(chunk: int) -> int:
        return B * H * -(-S // chunk) * K * V * 4

    fma_fwd_ms = 2 * B * H * S * K * V * V / (FP32_TFLOPS * 1e9)
    _chain_probe_ms(report)

    # Forward sweep: y of every variant against the default's (checked above against the reference).
    default = M2RNNKernelConfig()
    base_y = m2rnn_forward(*args, d, default.forward, default.chunk)[0]
    fwd_best: tuple[float, PassConfig] | None = None
    for bt, bk, nw, prec, fast in FWD_SWEEP:
        cfg = PassConfig(block_t=bt, block_k=bk, num_warps=nw, precision=prec, fast_tanh=fast)
        name = f"fwd bt{bt} bk{bk} w{nw} {prec}{' tanh.approx' if fast else ''}"
        try:
            ok = report.check(name + " vs default", _rel(m2rnn_forward(*args, d, cfg, 64)[0], base_y), 2e-2)
        except Exception as e:  # e.g. out of registers or shared memory for one launch shape
            report.row(name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        ms = _safe(
            report,
            name,
            lambda cfg=cfg: m2rnn_forward(*args, d, cfg, 64),
            floor_ms=chain_ms,
            bytes_floor_ms=(io_bytes + ckpt_bytes(64)) / (HBM_TBS * 1e9),
            fp32_fma_floor_ms=fma_fwd_ms if prec == "ieee" else None,
        )
        if ok and ms is not None and (fwd_best is None or ms < fwd_best[0]):
            fwd_best = (ms, cfg)

    # Backward sweep: gradients of every variant against the default's.
    ckpts = {c: m2rnn_forward(*args, d, default.forward, c)[2] for c in sorted({v[-1] for v in BWD_SWEEP})}

    def bwd(cfg: PassConfig, chunk: int) -> tuple:
        return m2rnn_backward(*args[:5], x["seq_idx"], ckpts[chunk], dy, None, False, d, cfg, chunk)

    base_g = bwd(default.backward, default.chunk)
    bwd_best: tuple[float, PassConfig, int] | None = None
    for bt, bk, nw, prec, fast, chunk in BWD_SWEEP:
        cfg = PassConfig(block_t=bt, block_k=bk, num_warps=nw, precision=prec, fast_tanh=fast)
        name = f"bwd bt{bt} bk{bk} w{nw} {prec}{' tanh.approx' if fast else ''} C{chunk}"
        try:
            got = bwd(cfg, chunk)
            err = max(_rel(a, r) for a, r in zip(got[:5], base_g[:5], strict=True))
            ok = report.check(name + " vs default", err, 5e-2)
        except Exception as e:
            report.row(name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        ms = _safe(
            report,
            name,
            lambda cfg=cfg, chunk=chunk: bwd(cfg, chunk),
            floor_ms=2 * chain_ms,
            bytes_floor_ms=(2 * io_bytes + 2 * B * S * G * K * 4 + ckpt_bytes(chunk)) / (HBM_TBS * 1e9),
            scratch_mib=B * H * -(-K // bk) * chunk * bk * max(V, 16) * 4 / 2**20,
            fp32_fma_floor_ms=3 * fma_fwd_ms if prec == "ieee" else None,
        )
        if ok and ms is not None and (bwd_best is None or ms < bwd_best[0]):
            bwd_best = (ms, cfg, chunk)

    # Forward+backward through the autograd Function: the default, then the best pair of the sweep.
    xg = {n: (t.detach().requires_grad_() if t.is_floating_point() else t) for n, t in x.items() if n != "h0"}

    def fwd(cfg: M2RNNKernelConfig) -> Callable[[], Any]:
        return lambda: m2rnn_scan(**xg, path="triton", config=cfg)

    def fwd_bwd(cfg: M2RNNKernelConfig) -> Callable[[], Any]:
        return lambda: m2rnn_scan(**xg, path="triton", config=cfg)[0].backward(dy)

    ckpt_mib = ckpt_bytes(default.chunk) / 2**20
    report.time("scan fwd default", fwd(default), floor_ms=chain_ms, goal_ms=1.5, config=repr(default))
    report.time(
        "scan fwd+bwd default", fwd_bwd(default), floor_ms=3 * chain_ms, goal_ms=7.5, ckpt_mib=ckpt_mib
    )
    if fwd_best and bwd_best:
        best = M2RNNKernelConfig(forward=fwd_best[1], backward=bwd_best[1], chunk=bwd_best[2])
        report.time("scan fwd best", fwd(best), floor_ms=chain_ms, goal_ms=1.5)
        report.time("scan fwd+bwd best", fwd_bwd(best), floor_ms=3 * chain_ms, goal_ms=7.5, best=repr(best))

    # The per-step reference, at a sequence where its ~10 launches per step stay affordable.
    s_ref = 256
    xr = {n: (t[:, :s_ref] if t.dim() > 1 and t.shape[1] == S else t) for n, t in xg.items()}
    xr = {n: (t.detach().requires_grad_() if t.is_floating_point() else t) for n, t in xr.items()}
    report.time(f"reference fwd (S={s_ref}, not 4096)", lambda: m2rnn_scan_reference(**xr))
    report.time(
        f"reference fwd+bwd (S={s_ref}, not 4096)",
        lambda: m2rnn_scan_reference(**xr)[0].backward(dy[:, :s_ref]),
    )

    # The whole mixer (projections, convs, gate, scan, norm) at NAM56R width.
    mixer = M2RNN(HIDDEN, num_heads=H, head_dim_k=K, head_dim_v=V, device="cuda", dtype=torch.bfloat16)
    hx = torch.randn(B, S, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    report.time(f"M2RNN mixer fwd hidden {HIDDEN}", lambda: mixer(hx, seq_idx=x["seq_idx"]))
    report.time(
        f"M2RNN mixer fwd+bwd hidden {HIDDEN}",
        lambda: mixer(hx, seq_idx=x["seq_idx"]).backward(torch.ones_like(hx)),
    )

"""M2RNN scan on one GPU at NAM56R dims: checks against the per-step reference, then a sweep of kernel
configurations (forward and backward timed separately; compiled first in parallel processes), then
forward+backward of the default and of the best swept pair, rows per program (block_k) at B1 and B4,
the reference at a short sequence, and the whole mixer.

    NAM_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu.sh m2rnn   # on the GPU machine: NAM_COMMIT=<sha> ...

Floors, stated beside the rows (H200, 1.98 GHz boost clock, 4.25 TB/s measured copy bandwidth):
- chain: the 4096 steps are dependent. One step is at least a V-long dot product (log2 V = 4 dependent
  FMA levels at best, 16 cycles), a tanh (one SFU tanh.approx, ~20 cycles) and the gate's sub + FMA
  (8 cycles): ~44 cycles, ~22 ns, so ~0.09 ms forward and twice that backward (recompute + reverse
  walk). The `chain probe` row measures 4096 dependent (FMA + tanh.approx) steps with no loads.
- bytes: what must cross HBM (inputs, outputs, checkpoints) over 4.25 TB/s; ~0.02 ms, never the limit.
- fp32 FMA: with precision "ieee" the state matmuls run on CUDA cores: 2*B*H*S*K*V*V flops (forward;
  x3 backward incl. recompute) over 67 TFLOP/s.
Checks: the default configuration against the per-step reference run in float64 on the same inputs,
with W = I + 0.1 * noise rescaled to spectral norm 0.95 so that the recurrence contracts (with
||W|| > 1 a step can expand rounding differences over a document and no two float32 implementations
agree, the float32 reference included; packages/nam-mixers/README.md, "Accuracy and conditioning").
The unrescaled case (||W|| ~1.4-1.7) is kept as information rows. Sweep variants: forward y against
float64, backward gradients against the default's. The rows-per-program rows (16, 4, 2) check each
split's y against float64 and its gradients against 16 rows' (tl.dot), so they cover the
multiply-and-sum products. The default stays 16 rows: on the H200 at 860e114 (fwd / fwd+bwd ms)
fewer rows lost fwd+bwd at B1 (16: 1.27 / 4.65, 4: 1.06 / 5.19, 2: 1.08 / 6.36) and both at B4
(16: 1.36 / 5.85, 4: 2.77 / 16.4, 2: 4.23 / 20.2).
Pin the fastest configuration that passes its check with `M2RNNKernelConfig(...)` as printed in the
`best` row (and as the default in nam_mixers/ops/m2rnn/config.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from bench.report import Report

B, S, H, K, V, G = 4, 4096, 44, 64, 16, 1
HIDDEN = 3584
CLOCK_GHZ, HBM_TBS, FP32_TFLOPS = 1.98, 4.25, 67.0  # HBM: bench/RESULTS.md ceilings
CHAIN_CYCLES = 44
DEVICE = "cuda"

# The sweep: every forward variant and every backward variant is compiled and timed once (in parallel
# processes first). Earlier sweeps (bench/RESULTS.md) settled the split (16 state rows, one warp, 704
# programs), chunk 32, tf32 state matmuls with tanh.approx for 16-bit inputs, and prefetching (a block's
# inputs loaded one block ahead, outputs stored once per block: no load waits behind a store inside the
# step chain). With prefetch, smaller blocks won (forward 1.59 ms at block_t 4 vs 3.92 at 16; backward
# 5.35 ms at 2 vs 8.72 at 4): the prefetched tiles live in registers, and a larger block spills (the
# backward spills 88 bytes at block_t 4). This sweep walks block_t down to 1 around that best, tries the
# atomic dq/dk sum there (7.74 vs 8.72 ms at block_t 4) and bf16 operands, and keeps exact fp32 and
# the previous non-prefetch kernels for comparison.
# Forward: (block_t, block_k, num_warps, precision, fast_tanh, prefetch).
FWD_SWEEP = [
    (8, 16, 1, "ieee", False, False),
    *[(bt, 16, 1, "tf32", True, True) for bt in (1, 2, 4, 8)],
    (4, 16, 1, "bf16", True, True),
    (4, 16, 1, "tf32", False, True),
    (4, 16, 1, "ieee", False, True),
]
# Backward: (block_t, block_k, num_warps, precision, fast_tanh, prefetch, chunk, dqk).
BWD_SWEEP = [
    (4, 16, 1, "ieee", False, False, 32, "per_head"),
    *[(bt, 16, 1, "tf32", True, True, 32, "per_head") for bt in (1, 2, 4)],
    *[(bt, 16, 1, "tf32", True, True, 32, "atomic") for bt in (1, 2)],
    (2, 16, 1, "tf32", True, True, 16, "per_head"),
    (2, 16, 1, "tf32", True, True, 64, "per_head"),
    (2, 16, 1, "bf16", True, True, 32, "per_head"),
    (2, 16, 1, "ieee", False, True, 32, "per_head"),
]
# Rows per program at the batch sizes training uses. At B1 the 16-row split is B*H*K/16 = 176
# programs for 132 SMs, each one latency-bound chain; fewer rows fill the SMs but run the products
# as float32 multiply-and-sum on CUDA cores instead of tl.dot. Timed: 16, 4 and 2 rows, fwd and
# fwd+bwd, the rest of the default configuration unchanged.
ROW_BATCHES = (1, B)
ROW_SPLITS = (16, 4, 2)


def _rel(a: Any, ref: Any) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _inputs(
    b: int, s: int, dtype: Any, seed: int, packed: bool = True, w_norm: float | None = 0.95
) -> dict[str, Any]:
    """Inputs as the module sees them at init, W = I + 0.1 * noise rescaled to spectral norm w_norm
    (None: not rescaled, ||W|| ~1.4-1.7: the recurrence is then unstable, see the module docstring)."""
    import torch

    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> Any:
        return (scale * torch.randn(*shape, device=DEVICE, generator=gen)).to(dtype)

    # Gate as the module makes it at init: f = exp(-softplus(x_f + dt_bias)), dt in [1e-3, 1e-1].
    dt = torch.exp(torch.empty(H, device=DEVICE).uniform_(-6.9, -2.3, generator=gen))
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    f = torch.exp(-torch.nn.functional.softplus(torch.randn(b, s, H, device=DEVICE, generator=gen) + dt_bias))
    w = torch.eye(V, device=DEVICE) + 0.1 * torch.randn(H, V, V, device=DEVICE, generator=gen)
    if w_norm is not None:
        w = w * (w_norm / torch.linalg.matrix_norm(w, ord=2))[:, None, None]
    x = {
        "q": rnd(b, s, G, K, scale=0.25),
        "k": rnd(b, s, G, K, scale=0.25),
        "v": rnd(b, s, H, V),
        "f": f,
        "w": w.to(dtype),
        "h0": rnd(b, H, K, V, scale=0.5).float(),
    }
    if packed:  # documents of random lengths (mean ~600 steps), one starting at a chunk edge (s/4)
        starts = torch.rand(b, s, device=DEVICE, generator=gen) < 1 / 600
        starts[:, s // 4] = True
        x["seq_idx"] = torch.cumsum(starts, dim=1).to(torch.int32)
    return x


def _grads(out: tuple[Any, Any], x: dict[str, Any], dy: Any, dht: Any) -> list[Any]:
    import torch

    names = [n for n in ("q", "k", "v", "f", "w", "h0") if n in x]
    loss = (out[0].to(dy.dtype) * dy).sum() + (out[1].to(dht.dtype) * dht).sum()
    return list(torch.autograd.grad(loss, [x[n] for n in names]))


def _float64(x: dict[str, Any]) -> dict[str, Any]:
    """The same (already rounded) inputs in float64, as leaves: the reference's exact-arithmetic twin."""
    return {n: (t.detach().double().requires_grad_() if t.is_floating_point() else t) for n, t in x.items()}


def _check_against_reference(report: Report, b: int, s: int, dtype: Any, tol_y: float, tol_g: float) -> None:
    """The default configuration against the per-step reference run in float64 on the same inputs.

    A float32 reference would not do: rounding differences between any two float32 implementations
    (the reference's own included) grow over a document unless the recurrence contracts, and on
    contracting inputs the float32 reference's error is itself of the order of the kernel's."""
    import torch

    from nam_mixers.ops.m2rnn import m2rnn_scan, m2rnn_scan_reference

    x = _inputs(b, s, dtype, seed=s)
    for n in ("q", "k", "v", "f", "w", "h0"):
        x[n].requires_grad_()
    x64 = _float64(x)
    out = m2rnn_scan(**x, path="triton")
    ref = m2rnn_scan_reference(**x64)
    dy = torch.randn_like(ref[0], dtype=torch.float32)
    dht = torch.randn_like(ref[1], dtype=torch.float32)
    tag = f"{str(dtype).removeprefix('torch.')} B{b} S{s} packed+h0, vs float64"
    report.check(f"y {tag}", _rel(out[0], ref[0]), tol_y)
    report.check(f"h_T {tag}", _rel(out[1], ref[1]), tol_y)
    got_g, want_g = _grads(out, x, dy, dht), _grads(ref, x64, dy.double(), dht.double())
    for n, got, want in zip(("q", "k", "v", "f", "W", "h0"), got_g, want_g, strict=True):
        report.check(f"d{n} {tag}", _rel(got, want), tol_g)


def _unstable_inputs_rows(report: Report, b: int, s: int) -> None:
    """Information, not a check: with W not rescaled (||W|| ~1.4-1.7) a step can expand differences,
    so rounding of the order of float32's already moves y by ~1e-4 over S steps; these rows show how
    far the kernel and a float32 reference each land from float64 there."""
    import torch

    from nam_mixers.ops.m2rnn import m2rnn_scan, m2rnn_scan_reference

    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            x = _inputs(b, s, dtype, seed=s, w_norm=None)
            y64, h64 = m2rnn_scan_reference(**_float64(x))
            y, ht = m2rnn_scan(**x, path="triton")
            yr, htr = m2rnn_scan_reference(**x)
            tag = f"{str(dtype).removeprefix('torch.')} B{b} S{s} unrescaled W (info)"
            report.row(f"kernel vs float64, {tag}", y_err=_rel(y, y64), h_T_err=_rel(ht, h64))
            report.row(f"float32 reference vs float64, {tag}", y_err=_rel(yr, y64), h_T_err=_rel(htr, h64))


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

    buf = torch.rand(B * H, device=DEVICE)
    report.time("chain probe: 4096 dependent fma+tanh.approx", lambda: probe[(B * H,)](buf, S, num_warps=1))


def _bench_inputs() -> tuple[dict[str, Any], tuple, Any, Any]:
    """The timed problem: NAM56R heads at B4 S4096 in bf16, packed rows, no initial state."""
    import torch

    from nam_mixers.ops.m2rnn.shapes import check_scan_inputs

    x = _inputs(B, S, torch.bfloat16, seed=0)
    args = (x["q"], x["k"], x["v"], x["f"], x["w"], None, x["seq_idx"])
    return x, args, check_scan_inputs(*args), torch.randn_like(x["v"])


def _rows_config(bk: int) -> Any:
    """The default configuration with block_k rows per program in both passes."""
    from dataclasses import replace

    from nam_mixers.ops.m2rnn import M2RNNKernelConfig

    d = M2RNNKernelConfig()
    return replace(d, forward=replace(d.forward, block_k=bk), backward=replace(d.backward, block_k=bk))


def _first_rows(x: dict[str, Any], b: int) -> dict[str, Any]:
    """The timed problem's first b batch rows (W is per head, not per row), as fresh leaves."""
    return {
        n: (t[:b] if n != "w" else t).detach().requires_grad_(t.is_floating_point())
        for n, t in x.items()
        if n != "h0"
    }


def _compile_variant(job: tuple) -> str:
    """Run one sweep variant once in a fresh process, leaving its kernels in Triton's on-disk cache.
    Returns "" or the error (a variant that faults must not take down the main process's context)."""
    try:
        import torch

        from nam_mixers.ops.m2rnn import M2RNNKernelConfig, PassConfig
        from nam_mixers.ops.m2rnn.backward import m2rnn_backward
        from nam_mixers.ops.m2rnn.forward import m2rnn_forward

        default = M2RNNKernelConfig()
        if job[0] == "check":  # the default's kernels as the checks specialise them (B 1, h0, dL/dh_T)
            from nam_mixers.ops.m2rnn import m2rnn_scan

            xc = _inputs(1, S, getattr(torch, job[1]), seed=S)
            xc["h0"].requires_grad_()
            y, ht = m2rnn_scan(**xc, path="triton", config=default)
            torch.autograd.grad(y.float().sum() + ht.sum(), xc["h0"])
            torch.cuda.synchronize()
            return ""
        x, args, d, dy = _bench_inputs()
        if job[0] == "rows":  # fwd+bwd at batch job[1] with job[2] rows per program
            from nam_mixers.ops.m2rnn import m2rnn_scan

            y = m2rnn_scan(**_first_rows(x, job[1]), path="triton", config=_rows_config(job[2]))[0]
            y.backward(dy[: job[1]])
        elif len(job) == 6:
            m2rnn_forward(*args, d, PassConfig(*job), default.chunk)
        else:
            bt, bk, nw, prec, fast, pre, chunk, dqk = job
            ckpt = m2rnn_forward(*args, d, default.forward, chunk)[2]
            cfg = PassConfig(bt, bk, nw, prec, fast, pre)
            m2rnn_backward(*args[:5], x["seq_idx"], ckpt, dy, None, False, d, cfg, chunk, dqk)
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # the serial sweep reports it again, with the variant's name
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _precompile(report: Report) -> dict[tuple, str]:
    """Compile the sweep in parallel (one CPU core per variant) so the GPU is not held while one core
    compiles ~30 kernels in a row; the sweep below then loads them from the cache. Returns the
    variants that failed there, with their errors, for the sweep to skip."""
    import multiprocessing as mp
    import os
    import time
    from concurrent.futures import ProcessPoolExecutor

    rows = [("rows", b, bk) for b in ROW_BATCHES for bk in ROW_SPLITS]
    jobs = [("check", "bfloat16"), ("check", "float32"), *FWD_SWEEP, *BWD_SWEEP, *rows]
    workers = max(1, min(len(jobs), os.cpu_count() or 1, 16))
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            failed = {job: e for job, e in zip(jobs, pool.map(_compile_variant, jobs), strict=True) if e}
    except Exception as e:  # precompiling is an optimisation: the sweep compiles what is missing
        failed = {}
        report.row("precompile skipped", error=f"{type(e).__name__}: {str(e)[:100]}")
    wall_ms = (time.perf_counter() - t0) * 1e3
    report.row(f"precompile {len(jobs)} variants, {workers} processes (wall)", ms=wall_ms, failed=len(failed))
    if failed and len(failed) == len(jobs):  # the worker set-up failed, not the variants: sweep them all
        report.row("precompile failed everywhere", error=next(iter(failed.values())))
        return {}
    return failed


def main(report: Report) -> None:
    import torch

    from nam_mixers import M2RNN
    from nam_mixers.ops.m2rnn import M2RNNKernelConfig, PassConfig, m2rnn_scan, m2rnn_scan_reference
    from nam_mixers.ops.m2rnn.backward import m2rnn_backward
    from nam_mixers.ops.m2rnn.forward import m2rnn_forward

    failed = _precompile(report)
    for job in (j for j in failed if j[0] == "check"):  # the checks below still run it, and say how it fails
        report.row(f"precompile of the default ({job[1]})", error=failed[job])
    # Correctness first: the default configuration against the reference at the real heads and sequence,
    # batch 1 (the per-step reference's autograd graph at B4 S4096 would need ~60 GB).
    _check_against_reference(report, 1, S, torch.bfloat16, 2e-2, 5e-2)
    _check_against_reference(report, 1, S, torch.float32, 1e-4, 1e-4)
    _unstable_inputs_rows(report, 1, S)

    chain_ms = S * CHAIN_CYCLES / (CLOCK_GHZ * 1e6)
    x, args, d, dy = _bench_inputs()
    io_bytes = 2 * B * S * G * K * 2 + B * S * H * (V * 2 * 2 + 4)  # q, k, v, y (bf16), f (fp32)

    def ckpt_bytes(chunk: int) -> int:
        return B * H * -(-S // chunk) * K * V * 4

    fma_fwd_ms = 2 * B * H * S * K * V * V / (FP32_TFLOPS * 1e9)
    _chain_probe_ms(report)

    # Forward sweep: y of every variant against the float64 reference on the same (bf16) inputs.
    default = M2RNNKernelConfig()
    with torch.no_grad():
        y64 = m2rnn_scan_reference(
            *(t.double() if t is not None and t.is_floating_point() else t for t in args)
        )[0]
    fwd_best: tuple[float, PassConfig] | None = None
    for job in FWD_SWEEP:
        bt, bk, nw, prec, fast, pre = job
        cfg = PassConfig(block_t=bt, block_k=bk, num_warps=nw, precision=prec, fast_tanh=fast, prefetch=pre)
        name = f"fwd bt{bt} bk{bk} w{nw} {prec}{' tanh.approx' if fast else ''}{' prefetch' if pre else ''}"
        if job in failed:
            report.row(name, error=failed[job])
            continue
        try:
            ok = report.check(
                name + " vs float64", _rel(m2rnn_forward(*args, d, cfg, default.chunk)[0], y64), 2e-2
            )
        except Exception as e:  # e.g. out of registers or shared memory for one launch shape
            report.row(name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        ms = _safe(
            report,
            name,
            lambda cfg=cfg: m2rnn_forward(*args, d, cfg, default.chunk),
            floor_ms=chain_ms,
            bytes_floor_ms=(io_bytes + ckpt_bytes(default.chunk)) / (HBM_TBS * 1e9),
            fp32_fma_floor_ms=fma_fwd_ms if prec == "ieee" else None,
        )
        if ok and ms is not None and (fwd_best is None or ms < fwd_best[0]):
            fwd_best = (ms, cfg)

    # Backward sweep: gradients of every variant against the default's (checked above against float64).
    ckpts = {
        c: m2rnn_forward(*args, d, default.forward, c)[2] for c in {default.chunk} | {v[6] for v in BWD_SWEEP}
    }

    def bwd(cfg: PassConfig, chunk: int, dqk: str) -> tuple:
        return m2rnn_backward(*args[:5], x["seq_idx"], ckpts[chunk], dy, None, False, d, cfg, chunk, dqk)

    base_g = bwd(default.backward, default.chunk, default.dqk)
    bwd_best: tuple[float, PassConfig, int, str] | None = None
    for job in BWD_SWEEP:
        bt, bk, nw, prec, fast, pre, chunk, dqk = job
        cfg = PassConfig(block_t=bt, block_k=bk, num_warps=nw, precision=prec, fast_tanh=fast, prefetch=pre)
        tags = f"{prec}{' tanh.approx' if fast else ''}{' prefetch' if pre else ''}"
        name = f"bwd bt{bt} bk{bk} w{nw} {tags} C{chunk} {dqk}"
        if job in failed:
            report.row(name, error=failed[job])
            continue
        try:
            got = bwd(cfg, chunk, dqk)
            err = max(_rel(a, r) for a, r in zip(got[:5], base_g[:5], strict=True))
            ok = report.check(name + " vs default", err, 5e-2)
        except Exception as e:
            report.row(name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        ms = _safe(
            report,
            name,
            lambda cfg=cfg, chunk=chunk, dqk=dqk: bwd(cfg, chunk, dqk),
            floor_ms=2 * chain_ms,
            bytes_floor_ms=(2 * io_bytes + 2 * B * S * G * K * 4 + ckpt_bytes(chunk)) / (HBM_TBS * 1e9),
            scratch_mib=B * H * -(-K // bk) * chunk * bk * max(V, 16) * 4 / 2**20,
            fp32_fma_floor_ms=3 * fma_fwd_ms if prec == "ieee" else None,
        )
        if ok and ms is not None and (bwd_best is None or ms < bwd_best[0]):
            bwd_best = (ms, cfg, chunk, dqk)

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
        # The forward stores the checkpoints, so the chunk must be a multiple of its block too; where the
        # best backward's chunk is not, keep the default chunk (the forward was timed with it).
        chunk = bwd_best[2] if bwd_best[2] % fwd_best[1].block_t == 0 else default.chunk
        best = M2RNNKernelConfig(forward=fwd_best[1], backward=bwd_best[1], chunk=chunk, dqk=bwd_best[3])
        report.time("scan fwd best", fwd(best), floor_ms=chain_ms, goal_ms=1.5)
        report.time("scan fwd+bwd best", fwd_bwd(best), floor_ms=3 * chain_ms, goal_ms=7.5, best=repr(best))

    # Rows per program at B1 and B4: y against float64 (the B4 reference's first rows), gradients
    # against 16 rows' (tl.dot; the default at B4), then the times.
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    names = ("q", "k", "v", "f", "w")
    for b in ROW_BATCHES:
        xb, dyb = _first_rows(x, b), dy[:b]
        base: tuple[int, list[Any]] | None = None
        for bk in ROW_SPLITS:
            cfg = _rows_config(bk)
            name = f"scan B{b} block_k {bk}"
            if ("rows", b, bk) in failed:
                report.row(name, error=failed[("rows", b, bk)])
                continue
            programs = b * H * -(-K // bk)
            try:
                y = m2rnn_scan(**xb, path="triton", config=cfg)[0]
                report.check(f"{name} y vs float64", _rel(y, y64[:b]), 2e-2)
                grads = list(torch.autograd.grad(y, [xb[n] for n in names], dyb))
            except Exception as e:
                report.row(name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            if base is None:
                base = (bk, grads)
            else:
                err = max(_rel(a, r) for a, r in zip(grads, base[1], strict=True))
                report.check(f"{name} grads vs block_k {base[0]}", err, 5e-2)
            extra = {
                "programs": programs,
                "per_sm": round(programs / sms, 2),
                "partial_mib": -(-K // bk) * b * S * H * V * 4 / 2**20,  # float32 y (fwd), dv (bwd)
            }
            run = partial(m2rnn_scan, **xb, path="triton", config=cfg)
            _safe(report, f"{name} fwd", run, floor_ms=chain_ms, **extra)
            _safe(
                report,
                f"{name} fwd+bwd",
                lambda run=run, dyb=dyb: run()[0].backward(dyb),
                floor_ms=3 * chain_ms,
            )

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
    mixer = M2RNN(HIDDEN, num_heads=H, head_dim_k=K, head_dim_v=V, device=DEVICE, dtype=torch.bfloat16)
    hx = torch.randn(B, S, HIDDEN, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    report.time(f"M2RNN mixer fwd hidden {HIDDEN}", lambda: mixer(hx, seq_idx=x["seq_idx"]))
    report.time(
        f"M2RNN mixer fwd+bwd hidden {HIDDEN}",
        lambda: mixer(hx, seq_idx=x["seq_idx"]).backward(torch.ones_like(hx)),
    )

"""Mamba3Mixer (the M letter's kind "mamba3") at NAM56R width: our triton path against our
reference and against mamba-ssm's own Mamba3 module (SISO) at the same weights.

    bash bench/gpu.sh mamba3

Checks first, on fresh inputs: bf16 triton path and bf16 mamba-ssm Mamba3 each against our fp32
reference path (outputs within 2e-2, gradients within 5e-2 of max|ref|), and the triton path with
packed rows (its variable-length form) against the reference with the same documents; ours against
mamba-ssm's Mamba3 directly (the same kernels: within 1e-2). Then forward
and forward+backward time and peak memory: ours, ours with packed rows (one host sync per call for
cu_seqlens), mamba-ssm's Mamba3, and the cores alone. Floors: max(flops / 700 TFLOP/s, bytes /
4.25 TB/s) per stage (bench/RESULTS.md, ceilings).
"""

from __future__ import annotations

from typing import Any

from bench.mamba import _fwd, _fwd_bwd, _packed_seq_idx, _rel
from bench.report import Report

HIDDEN, EXPAND, HEADDIM, D_STATE, NGROUPS, CHUNK = 3584, 2, 64, 64, 8, 64
BATCH, SEQ = 2, 4096  # GPU.md's Mamba3 shape (b2 l4096 d3584)
DEVICE = "cuda"
TFLOPS, TBPS = 700e12, 4.25e12  # measured H200 ceilings (bench/RESULTS.md)
# our parameter name -> Mamba3's (in_proj and angle_proj together are its in_proj)
MAMBA3_NAMES = {
    "core.dt_bias": "dt_bias",
    "core.B_bias": "B_bias",
    "core.C_bias": "C_bias",
    "core.B_norm_weight": "B_norm.weight",
    "core.C_norm_weight": "C_norm.weight",
    "core.D": "D",
    "out_proj.weight": "out_proj.weight",
}


def _floors_ms(d_in_proj: int, n_angles: int, d_inner: int, nheads: int) -> dict[str, float]:
    """Lower bounds in ms for one layer: the projections at the matmul rate, the core at the copy
    rate or its own matmuls' rate (q.k within a chunk, chunk states, state output)."""
    tokens, bf16 = BATCH * SEQ, 2
    gemm = 2 * tokens * HIDDEN * (d_in_proj + n_angles + d_inner)
    core_fwd = tokens * (d_in_proj + d_inner) * bf16
    core_bwd = tokens * (2 * d_in_proj + 2 * d_inner) * bf16
    scan = 2 * tokens * nheads * (CHUNK * D_STATE + CHUNK * HEADDIM + 2 * HEADDIM * D_STATE)
    core_f = max(core_fwd / TBPS, scan / TFLOPS)
    core_b = max(core_bwd / TBPS, 2 * scan / TFLOPS)
    return {
        "fwd": 1e3 * (gemm / TFLOPS + core_f),
        "fwd+bwd": 1e3 * (3 * gemm / TFLOPS + core_f + core_b),
        "core fwd": 1e3 * core_f,
        "core fwd+bwd": 1e3 * (core_f + core_b),
    }


def main(report: Report) -> None:
    import torch

    from nam_mixers import Mamba3Mixer
    from nam_mixers.ops.mamba3 import check_available

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    check_available("triton")  # raises, naming what is missing
    kw = {"expand": EXPAND, "headdim": HEADDIM, "d_state": D_STATE, "ngroups": NGROUPS, "chunk_size": CHUNK}
    ours = Mamba3Mixer(HIDDEN, **kw, path="triton", device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():  # off the initial ones (biases, norm weights, D) so every parameter matters
        for p in ours.core.parameters():
            p.mul_(1 + 0.2 * torch.rand_like(p))
    ref = Mamba3Mixer(HIDDEN, **kw, path="reference", device=DEVICE, dtype=torch.float32)
    ref.load_state_dict(ours.state_dict())
    theirs = _mamba3(torch, ours)
    s = ours.core.shape
    names = [n for n, _ in ours.named_parameters()]

    def grads_of(m: Any, y: Any, u: Any, dy: Any) -> list[Any]:
        """Gradients of the input and of our parameters, in our order (for Mamba3: its in_proj
        gradient split into our in_proj and angle_proj)."""
        if m is not theirs:
            return list(torch.autograd.grad(y, [u, *m.parameters()], dy))
        params, mapped = dict(m.named_parameters()), [n for n in names if n in MAMBA3_NAMES]
        g_u, g_in, *rest = torch.autograd.grad(
            y, [u, params["in_proj.weight"], *(params[MAMBA3_NAMES[n]] for n in mapped)], dy
        )
        by_name = dict(zip(mapped, rest, strict=True))
        by_name["in_proj.weight"], by_name["angle_proj.weight"] = g_in[: s.d_in_proj], g_in[s.d_in_proj :]
        return [g_u, *(by_name[n] for n in names)]

    same_rows: dict[str, tuple[Any, list[Any]]] = {}  # whole rows: each module's output and grads
    for packed in (False, True):
        u = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
        dy = torch.randn_like(u)
        seq_idx = _packed_seq_idx(torch, gen)[:BATCH] if packed else None
        u32 = u.float().requires_grad_()
        y_ref = ref(u32, seq_idx)
        g_ref = torch.autograd.grad(y_ref, [u32, *ref.parameters()], dy.float())
        for name, m in (("ours triton", ours), ("mamba-ssm Mamba3", theirs)):
            if packed and m is theirs:  # its packed form is cu_seqlens at batch 1; ours is checked
                continue
            ub = u.clone().requires_grad_()
            y = m(ub) if m is theirs else m(ub, seq_idx)
            grads = grads_of(m, y, ub, dy)
            tag = f"{name}{' packed' if packed else ''}"
            report.check(f"{tag} output vs fp32 reference", _rel(y, y_ref), 2e-2)
            errors = {
                n: _rel(g.reshape(r.shape), r)
                for n, g, r in zip(["input", *names], grads, g_ref, strict=True)
            }
            worst = max(errors, key=errors.__getitem__)
            report.check(f"{tag} grads, worst: {worst}", errors[worst], 5e-2)
            if not packed:
                same_rows[name] = (y.detach(), [g.detach() for g in grads])
        del y_ref, g_ref, y, grads
    # the same kernels at the same weights: what differs is only our split of in_proj (bf16 rounding)
    (y_ours, g_ours), (y_theirs, g_theirs) = same_rows["ours triton"], same_rows["mamba-ssm Mamba3"]
    report.check("ours vs mamba-ssm Mamba3 output", _rel(y_ours, y_theirs), 1e-2)
    errors = {
        n: _rel(a.reshape(b.shape), b) for n, a, b in zip(["input", *names], g_ours, g_theirs, strict=True)
    }
    worst = max(errors, key=errors.__getitem__)
    report.check(f"ours vs mamba-ssm Mamba3 grads, worst: {worst}", errors[worst], 1e-2)
    del same_rows, y_ours, g_ours, y_theirs, g_theirs
    del ref
    torch.cuda.empty_cache()

    floors = _floors_ms(s.d_in_proj, s.n_angles, s.d_inner, s.nheads)
    u = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(u)
    packed_idx = _packed_seq_idx(torch, gen)[:BATCH]
    ms = {}
    for tag, m, seq_idx in (
        ("ours triton", ours, None),
        ("ours triton packed", ours, packed_idx),
        ("mamba-ssm Mamba3", theirs, None),
    ):
        ms[f"{tag} fwd"] = report.time(f"{tag} fwd", _fwd(torch, m, u, seq_idx), floor_ms=floors["fwd"])
        ms[f"{tag} fwd+bwd"] = report.time(
            f"{tag} fwd+bwd", _fwd_bwd(m, u, dy, seq_idx), floor_ms=floors["fwd+bwd"]
        )
    for case in ("fwd", "fwd+bwd"):  # the goal: >= 0.95
        report.row(
            f"Mamba3 time / ours, {case}", ratio=ms[f"mamba-ssm Mamba3 {case}"] / ms[f"ours triton {case}"]
        )

    # the core alone (no projections)
    zxbcdt = torch.randn(BATCH, SEQ, s.d_in_proj, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    angles = torch.randn(BATCH, SEQ, s.n_angles, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dcore = torch.randn(BATCH, SEQ, s.d_inner, device=DEVICE, dtype=torch.bfloat16)

    def core_fwd() -> None:
        with torch.no_grad():
            ours.core(zxbcdt, angles)

    def core_fwd_bwd() -> None:
        zxbcdt.grad = angles.grad = None
        ours.core.zero_grad(set_to_none=True)
        ours.core(zxbcdt, angles).backward(dcore)

    report.time("ours triton core fwd", core_fwd, floor_ms=floors["core fwd"])
    report.time("ours triton core fwd+bwd", core_fwd_bwd, floor_ms=floors["core fwd+bwd"])


def _mamba3(torch: Any, ours: Any) -> Any:
    """mamba-ssm's Mamba3 (SISO) at the same shape with our weights: its in_proj is our in_proj
    then our angle_proj, its B/C biases carry a rank-1 MIMO dimension."""
    from mamba_ssm.modules.mamba3 import Mamba3

    m = Mamba3(
        HIDDEN,
        d_state=D_STATE,
        expand=EXPAND,
        headdim=HEADDIM,
        ngroups=NGROUPS,
        rope_fraction=0.5,
        chunk_size=CHUNK,
        is_mimo=False,
        device=DEVICE,
        dtype=torch.bfloat16,
    )
    params, mine = dict(m.named_parameters()), dict(ours.named_parameters())
    with torch.no_grad():
        params["in_proj.weight"].copy_(torch.cat([mine["in_proj.weight"], mine["angle_proj.weight"]]))
        for name, theirs in MAMBA3_NAMES.items():
            params[theirs].copy_(mine[name].reshape(params[theirs].shape))
    return m

"""MambaMixer at NAM56R width on every available path, against the reference and against
mamba-ssm's own Mamba2 module at the same shape.

    bash bench/gpu.sh mamba

Checks first (bf16 against an fp32 reference on the GPU: outputs within 2e-2, gradients within
5e-2 of max|ref|, with and without packed rows), then forward and forward+backward time and peak
memory per path beside Mamba2 (use_mem_eff_path when causal-conv1d imports; seq_idx=None), packed
rows timed separately, and the core alone. Floors: each stage's max(flops / 700 TFLOP/s,
bytes / 4.25 TB/s) summed over in_proj, core and out_proj (bench/RESULTS.md, ceilings).
"""

from __future__ import annotations

from typing import Any

from bench.report import Report

HIDDEN, EXPAND, HEADDIM, D_STATE, NGROUPS, CHUNK = 3584, 2, 64, 64, 8, 128
BATCH, SEQ = 4, 4096
DEVICE = "cuda"
TFLOPS, TBPS = 700e12, 4.25e12  # measured H200 ceilings (bench/RESULTS.md)
# our parameter name -> Mamba2's
MAMBA2_NAMES = {
    "core.conv_weight": "conv1d.weight",
    "core.conv_bias": "conv1d.bias",
    "core.dt_bias": "dt_bias",
    "core.A_log": "A_log",
    "core.D": "D",
    "core.norm_weight": "norm.weight",
}


def _floors_ms(d_in_proj: int, d_inner: int, nheads: int) -> dict[str, float]:
    """Lower bounds in ms for one layer: matmuls at the matmul rate, the core at the copy rate."""
    tokens, bf16 = BATCH * SEQ, 2
    gemm = 2 * tokens * HIDDEN * (d_in_proj + d_inner)  # in_proj and out_proj, forward
    # core forward reads the in_proj output and writes y; backward also reads y and dy and writes
    # the in_proj gradient (the conv is recomputed from the saved input, not stored)
    core_fwd = tokens * (d_in_proj + d_inner) * bf16
    core_bwd = tokens * (d_in_proj + 2 * d_inner + d_in_proj) * bf16
    # the scan's own matmuls (C.B, intra-chunk, chunk states, state output), small beside the above
    scan = 2 * tokens * nheads * HEADDIM * (CHUNK + 2 * D_STATE) + 2 * tokens * NGROUPS * CHUNK * D_STATE
    core_f = max(core_fwd / TBPS, scan / TFLOPS)
    core_b = max(core_bwd / TBPS, 2 * scan / TFLOPS)
    return {
        "fwd": 1e3 * (gemm / TFLOPS + core_f),
        "fwd+bwd": 1e3 * (3 * gemm / TFLOPS + core_f + core_b),
        "core fwd": 1e3 * core_f,
        "core fwd+bwd": 1e3 * (core_f + core_b),
    }


def _rel(a: Any, ref: Any) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def _packed_seq_idx(torch: Any, gen: Any) -> Any:
    """Four to eight documents of random lengths per row."""
    rows = []
    for _ in range(BATCH):
        cuts = torch.randint(1, SEQ, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen)
        rows.append(torch.zeros(SEQ, dtype=torch.int32).index_fill_(0, cuts, 1).cumsum(0))
    return torch.stack(rows).to(torch.int32).to(DEVICE)


def main(report: Report) -> None:
    import torch

    from nam_mixers import MambaMixer
    from nam_mixers.ops.ssd import check_available
    from nam_mixers.ops.ssd.backends import import_error

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    kw = {"expand": EXPAND, "headdim": HEADDIM, "d_state": D_STATE, "ngroups": NGROUPS, "chunk_size": CHUNK}
    paths = []
    for path in ("fused", "split"):
        try:
            check_available(path)
            paths.append(path)
        except RuntimeError as e:
            report.row(f"path {path} unavailable", reason=str(e).split(";")[0])
    ours = MambaMixer(HIDDEN, **kw, path="reference", device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():  # off the initial values (D = 1, norm weight = 1) so every parameter matters
        for p in ours.core.parameters():
            p.mul_(1 + 0.2 * torch.rand_like(p))
    ref = MambaMixer(HIDDEN, **kw, path="reference", device=DEVICE, dtype=torch.float32)
    ref.load_state_dict(ours.state_dict())
    s = ours.core.shape

    mamba2 = _mamba2(torch, ours)
    # Mamba2's torch-conv fallback (no causal-conv1d) refuses seq_idx
    mamba2_packs = import_error("causal_conv1d") is None
    modules = {path: ours for path in paths}
    if mamba2 is not None:
        modules["mamba-ssm Mamba2"] = mamba2

    # correctness: fresh inputs per check; bf16 module against the fp32 reference path
    names = [n for n, _ in ours.named_parameters()]
    for packed in (False, True):
        u = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
        dy = torch.randn_like(u)
        seq_idx = _packed_seq_idx(torch, gen) if packed else None
        u32 = u.float().requires_grad_()
        y_ref = ref(u32, seq_idx)
        g_ref = torch.autograd.grad(y_ref, [u32, *ref.parameters()], dy.float())
        for name, m in modules.items():
            if packed and m is mamba2 and not mamba2_packs:
                continue
            if name in paths:
                ours.path = name
            ub = u.clone().requires_grad_()
            y = m(ub, seq_idx=seq_idx)
            params, rename = dict(m.named_parameters()), MAMBA2_NAMES if m is mamba2 else {}
            grads = torch.autograd.grad(y, [ub, *(params[rename.get(n, n)] for n in names)], dy)
            tag = f"{name}{' packed' if packed else ''}"
            report.check(f"{tag} output vs fp32 reference", _rel(y, y_ref), 2e-2)
            errors = {
                n: _rel(g.reshape(r.shape), r)
                for n, g, r in zip(["input", *names], grads, g_ref, strict=True)
            }
            worst = max(errors, key=errors.__getitem__)
            report.check(f"{tag} grads, worst: {worst}", errors[worst], 5e-2)
        del y_ref, g_ref, y, grads
    del ref
    torch.cuda.empty_cache()

    floors = _floors_ms(s.d_in_proj, s.d_inner, s.nheads)
    u = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(u)
    packed_idx = _packed_seq_idx(torch, gen)
    ms: dict[str, float] = {}
    for name, m in {**modules, "reference": ours}.items():
        if name in (*paths, "reference"):
            ours.path = name
        for packed in (False, True):
            if packed and (name == "reference" or (m is mamba2 and not mamba2_packs)):
                continue
            seq_idx = packed_idx if packed else None
            tag = f"{name}{' packed' if packed else ''}"
            ms[f"{tag} fwd"] = report.time(f"{tag} fwd", _fwd(torch, m, u, seq_idx), floor_ms=floors["fwd"])
            ms[f"{tag} fwd+bwd"] = report.time(
                f"{tag} fwd+bwd", _fwd_bwd(m, u, dy, seq_idx), floor_ms=floors["fwd+bwd"]
            )
    for case in ("fwd", "fwd+bwd", "packed fwd", "packed fwd+bwd"):
        best = min((ms[f"{p} {case}"], p) for p in paths) if paths else None
        theirs = ms.get(f"mamba-ssm Mamba2 {case}")
        if best and theirs:  # the goal: >= 0.95
            report.row(f"Mamba2 time / our best ({best[1]}), {case}", ratio=theirs / best[0])

    # the core alone (no projections): where the non-matmul time goes
    zxbcdt = torch.randn(BATCH, SEQ, s.d_in_proj, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dcore = torch.randn(BATCH, SEQ, s.d_inner, device=DEVICE, dtype=torch.bfloat16)
    for path in paths:
        ours.path = path
        report.time(f"{path} core fwd", _fwd(torch, ours.core, zxbcdt, None), floor_ms=floors["core fwd"])
        report.time(
            f"{path} core fwd+bwd", _fwd_bwd(ours.core, zxbcdt, dcore, None), floor_ms=floors["core fwd+bwd"]
        )


def _fwd(torch: Any, m: Any, u: Any, seq_idx: Any) -> Any:
    def run() -> None:
        with torch.no_grad():
            m(u, seq_idx=seq_idx)

    return run


def _fwd_bwd(m: Any, u: Any, dy: Any, seq_idx: Any) -> Any:
    def run() -> None:
        m.zero_grad(set_to_none=True)
        u.grad = None
        m(u, seq_idx=seq_idx).backward(dy)

    return run


def _mamba2(torch: Any, ours: Any) -> Any:
    """mamba-ssm's Mamba2 at the same shape with our weights; None where mamba-ssm is absent."""
    from nam_mixers.ops.ssd.backends import import_error

    if import_error("mamba_ssm.modules.mamba2") is not None:
        return None
    from mamba_ssm.modules.mamba2 import Mamba2

    m = Mamba2(
        HIDDEN,
        d_state=D_STATE,
        expand=EXPAND,
        headdim=HEADDIM,
        ngroups=NGROUPS,
        chunk_size=CHUNK,
        rmsnorm=True,
        norm_before_gate=False,
        use_mem_eff_path=import_error("causal_conv1d") is None,
        device=DEVICE,
        dtype=torch.bfloat16,
    )
    theirs = dict(m.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            t = theirs[MAMBA2_NAMES.get(name, name)]
            t.copy_(p.reshape(t.shape))
    return m

"""The Mamba-3 mixer core on its two paths: in_proj output [z, x, B, C, dt, A, trap] and the shared
angle projection -> (y + D x) * silu(z) [b, l, d_inner].

'triton' runs mamba-ssm's Mamba-3 SISO kernels (`mamba3_siso_combined`: rotary, trapezoidal scan,
D skip and z gate in one autograd function) after its Triton RMSNorm on B and C; 'reference' is
plain PyTorch (inputs.py, chunked.py) on any device, float64 included. Both take the same tensors,
so one parameter set runs on either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from nam_mixers.ops.imports import import_error
from nam_mixers.ops.mamba3.chunked import mamba3_chunked
from nam_mixers.ops.mamba3.inputs import (
    Mamba3Shape,
    Mamba3Weights,
    document_cumsum,
    next_in_document,
    prepare,
    rotate,
)

PATHS = ("triton", "reference")
CHOICES = ("auto", *PATHS)
KERNELS = "mamba_ssm.ops.triton.mamba3.mamba3_siso_combined"


def check_available(path: str) -> None:
    """Raise naming what is missing if `path` cannot run in this environment."""
    if path not in CHOICES:
        raise ValueError(f"Mamba3Mixer: unknown path {path!r}; accepted: {', '.join(CHOICES)}")
    reason = import_error(KERNELS) if path == "triton" else None
    if reason is not None:
        raise RuntimeError(
            f"Mamba3Mixer path='triton' needs mamba-ssm >= 2.3 (its Mamba-3 SISO Triton kernels), which "
            f"does not import here ({reason}); see packages/nam-mixers/README.md, 'CUDA paths', or use "
            f"path='reference'"
        )


def resolve_path(path: str, device: torch.device) -> str:
    """'auto' is 'triton' for CUDA tensors where mamba-ssm imports, else 'reference'. The kernels
    use PTX (cos/sin/tanh.approx, TMA descriptors): no Triton interpreter, CUDA tensors only."""
    check_available(path)
    if path == "auto":
        return "triton" if device.type == "cuda" and import_error(KERNELS) is None else "reference"
    if path == "triton" and device.type != "cuda":
        raise RuntimeError(f"Mamba3Mixer path='triton' runs on CUDA tensors only; got tensors on {device}")
    return path


Core = Callable[[torch.Tensor, torch.Tensor, Mamba3Weights, Mamba3Shape, torch.Tensor | None], torch.Tensor]


def core_reference(
    zxbcdt: torch.Tensor, angles: torch.Tensor, w: Mamba3Weights, s: Mamba3Shape, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """Plain PyTorch in at least float32 (float64 stays float64), cast back at the end."""
    dtype = zxbcdt.dtype
    ct = torch.promote_types(dtype, torch.float32)
    t = prepare(zxbcdt.to(ct), angles.to(ct), w, s)
    theta = document_cumsum(t.rate, seq_idx)
    gamma = t.lam * t.dt
    scale = gamma + next_in_document((1 - t.lam) * t.dt, seq_idx)
    y = mamba3_chunked(
        rotate(t.q, theta), rotate(t.k, theta), t.v, t.adt, gamma, scale, s.chunk_size, seq_idx
    )
    y = (y + w.D.to(ct)[:, None] * t.v) * F.silu(t.z)
    return y.flatten(-2).to(dtype)


def cu_seqlens_of(seq_idx: torch.Tensor) -> torch.Tensor:
    """The documents of seq_idx [b, l] as the kernels' variable-length segments of the b * l tokens
    flattened row by row (int32, 0 first): a new one at every row start and document change. Their
    number depends on the data: one host sync."""
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = starts.reshape(-1).nonzero().squeeze(1)
    return torch.cat([first, first.new_full((1,), seq_idx.numel())]).to(torch.int32)


def core_triton(
    zxbcdt: torch.Tensor, angles: torch.Tensor, w: Mamba3Weights, s: Mamba3Shape, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """mamba-ssm's Triton kernels as its Mamba3 module calls them. Packed rows go in as its
    variable-length form: the batch flattened into one row of segments (cu_seqlens)."""
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

    b, seqlen, _ = zxbcdt.shape
    z, x, B, C, dd_dt, dd_A, trap = torch.split(zxbcdt, s.widths, dim=-1)
    dt = F.softplus(dd_dt.float() + w.dt_bias.float())
    adt = (-F.softplus(dd_A.float())).clamp(max=-s.A_floor) * dt
    B, C = (
        rmsnorm_fn(t.unflatten(-1, (s.ngroups, s.d_state)), weight.float(), None, eps=s.norm_eps)
        for t, weight in ((B, w.B_norm_weight), (C, w.C_norm_weight))
    )
    heads = (s.nheads, s.headdim)
    cu_seqlens, rows = None, b
    if seq_idx is not None:  # the kernels take packed documents only as one flattened row
        cu_seqlens, rows = cu_seqlens_of(seq_idx), 1

    def tokens(t: torch.Tensor) -> torch.Tensor:  # [b, l, ...] -> [rows, b * l / rows, ...]
        return t.reshape(rows, b * seqlen // rows, *t.shape[2:])

    def per_head(t: torch.Tensor) -> torch.Tensor:  # [b, l, h] -> [rows, h, tokens]
        return tokens(t).transpose(1, 2)

    y = mamba3_siso_combined(
        Q=tokens(C),
        K=tokens(B),
        V=tokens(x.unflatten(-1, heads)),
        ADT=per_head(adt),
        DT=per_head(dt),
        Trap=per_head(trap),
        Q_bias=w.C_bias.float(),
        K_bias=w.B_bias.float(),
        Angles=tokens(angles.float()[:, :, None, :].expand(b, seqlen, s.nheads, s.n_angles)),
        D=w.D.float(),
        Z=tokens(z.unflatten(-1, heads)),
        chunk_size=s.chunk_size,
        cu_seqlens=cu_seqlens,
    )
    return y.reshape(b, seqlen, s.d_inner).to(zxbcdt.dtype)


CORES: dict[str, Core] = {"reference": core_reference, "triton": core_triton}

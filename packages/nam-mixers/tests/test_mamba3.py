"""Mamba-3's reference path against the recurrence stepped one token at a time, in float64.

The chunked scan (ops/mamba3/chunked.py) and the per-token step (ops/mamba3/step.py, also what
decoding runs) are written independently; they must agree for any chunk size, odd lengths and
packed rows, in values and in the gradients of every input and parameter.
"""

from __future__ import annotations

import pytest
import torch

from nam_mixers import Mamba3Core, Mamba3Mixer
from nam_mixers.ops.mamba3 import Mamba3State, cu_seqlens_of, mamba3_step, prepare

F64 = torch.float64


def stepped(
    core: Mamba3Core, zxbcdt: torch.Tensor, angles: torch.Tensor, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """The definition: mamba3_step token by token, a zero state at every document start."""
    s, w = core.shape, core._weights()
    b, seqlen, _ = zxbcdt.shape
    zero = Mamba3State.zeros(b, s.nheads, s.headdim, s.d_state, s.n_angles, zxbcdt)
    state, ys = zero, []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:  # a document start: back to the zero state
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(F64)
            state = Mamba3State(*(x * same.view(b, *[1] * (x.dim() - 1)) for x in vars(state).values()))
        inputs = prepare(zxbcdt[:, t], angles[:, t], w, s)
        y, state = mamba3_step(state, inputs, core.D)
        ys.append((y * torch.nn.functional.silu(inputs.z)).flatten(-2))
    return torch.stack(ys, dim=1)


def _core(chunk: int, ngroups: int = 2, d_state: int = 8, rope_fraction: float = 0.5) -> Mamba3Core:
    core = Mamba3Core(
        4,
        headdim=3,
        d_state=d_state,
        ngroups=ngroups,
        chunk_size=chunk,
        rope_fraction=rope_fraction,
        path="reference",
        dtype=F64,
    )
    with torch.no_grad():
        for p in core.parameters():  # away from the init's ones
            p.add_(0.3 * torch.randn_like(p))
    return core


@pytest.mark.parametrize(
    ("seqlen", "chunk", "boundaries", "rope_fraction"),
    [(11, 4, (), 0.5), (13, 5, (3, 9), 0.5), (8, 8, (1,), 1.0), (7, 16, (4,), 0.5)],
)
def test_reference_equals_stepped_recurrence(
    seqlen: int, chunk: int, boundaries: tuple[int, ...], rope_fraction: float
) -> None:
    torch.manual_seed(seqlen)
    core = _core(chunk, rope_fraction=rope_fraction)
    s = core.shape
    zxbcdt = torch.randn(2, seqlen, s.d_in_proj, dtype=F64, requires_grad=True)
    angles = (2 * torch.randn(2, seqlen, s.n_angles, dtype=F64)).requires_grad_()
    seq_idx = None
    if boundaries:
        seq_idx = torch.zeros(2, seqlen, dtype=torch.int64)
        for at in boundaries:
            seq_idx[0, at:] += 1  # row 1 stays one document
    got = core(zxbcdt, angles, seq_idx)
    want = stepped(core, zxbcdt, angles, seq_idx)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(got)
    params = [zxbcdt, angles, *core.parameters()]
    g_got = torch.autograd.grad(got, params, dy)
    g_want = torch.autograd.grad(want, params, dy)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_packed_rows_equal_documents_alone() -> None:
    torch.manual_seed(1)
    mixer = Mamba3Mixer(
        12, expand=1, headdim=3, d_state=8, ngroups=2, chunk_size=4, path="reference", dtype=F64
    )
    x = torch.randn(1, 10, 12, dtype=F64)
    packed = mixer(x, torch.tensor([[0] * 6 + [1] * 4]))
    torch.testing.assert_close(packed[:, :6], mixer(x[:, :6]))
    torch.testing.assert_close(packed[:, 6:], mixer(x[:, 6:]))


def test_cu_seqlens_of_starts_every_row_and_document() -> None:
    seq_idx = torch.tensor([[0, 0, 1, 1], [5, 5, 5, 6]])
    assert cu_seqlens_of(seq_idx).tolist() == [0, 2, 4, 7, 8]


def test_paths_fail_with_one_clear_line() -> None:
    with pytest.raises(ValueError, match="unknown path 'fused'; accepted: auto, triton, reference"):
        Mamba3Core(2, headdim=4, d_state=8, path="fused")
    core = Mamba3Core(2, headdim=4, d_state=8, path="reference")
    assert core.resolved_path == "reference"
    try:
        core.path = "triton"
    except RuntimeError as err:  # mamba-ssm absent: the message names it
        assert "mamba-ssm" in str(err)
        return
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        core(torch.zeros(1, 2, core.shape.d_in_proj), torch.zeros(1, 2, core.shape.n_angles))

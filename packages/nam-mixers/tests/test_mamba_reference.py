"""The pure-PyTorch Mamba path against per-step definitions, in float64.

The naive recurrence below walks time one token at a time, resetting the state where the document
changes; the chunked scan (ops/ssd/chunked.py) must agree with it for any chunk size, sequence
length (odd ones included) and packing, in values and in gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nam_mixers import MambaMixer
from nam_mixers.ops.ssd import causal_conv1d_torch, ssd_chunked

F64 = torch.float64


def naive_ssd(x, dt, A, B, C, D, seq_idx):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D x_t; S = 0 at a document start."""
    b, seqlen, h, p = x.shape
    r = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(r, dim=2), C.repeat_interleave(r, dim=2)  # [b, l, h, n]
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1])[:, None, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1)


def naive_conv(x, weight, bias, seq_idx):
    """Each document convolved on its own, zero-padded at its start."""
    out = torch.empty_like(x)
    width = weight.shape[1]
    for row in range(x.shape[0]):
        ids = seq_idx[row] if seq_idx is not None else torch.zeros(x.shape[1], dtype=torch.long)
        for doc in ids.unique():
            cols = (ids == doc).nonzero().flatten()
            seg = x[row, cols].T[None]  # [1, d, len]
            y = F.conv1d(F.pad(seg, (width - 1, 0)), weight[:, None], bias, groups=x.shape[-1])
            out[row, cols] = y[0].T
    return out


def random_seq_idx(draw, b: int, seqlen: int) -> torch.Tensor | None:
    if not draw(st.booleans()):
        return None
    rows = []
    for _ in range(b):
        starts = draw(st.lists(st.integers(1, max(seqlen - 1, 1)), max_size=4))
        row = torch.zeros(seqlen, dtype=torch.long)
        for s in starts:
            row[s:] += 1
        rows.append(row)
    return torch.stack(rows)


@st.composite
def ssd_cases(draw):
    b, seqlen = draw(st.integers(1, 2)), draw(st.integers(1, 41))
    g = draw(st.integers(1, 2))
    h = g * draw(st.integers(1, 3))
    p, n = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    chunk = draw(st.sampled_from([1, 3, 4, 8, 16, 64]))
    return b, seqlen, h, g, p, n, chunk, random_seq_idx(draw, b, seqlen), draw(st.integers(0, 2**31 - 1))


def _grads(out, inputs, probe):
    return torch.autograd.grad((out * probe).sum(), inputs)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@settings(max_examples=40, deadline=None)
@given(ssd_cases())
def test_chunked_scan_matches_per_step_recurrence(case) -> None:
    b, seqlen, h, g, p, n, chunk, seq_idx, seed = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    x, B, C = rand(b, seqlen, h, p), rand(b, seqlen, g, n), rand(b, seqlen, g, n)
    dt = F.softplus(rand(b, seqlen, h))
    A = -torch.exp(rand(h) * 0.5)
    D = rand(h)
    inputs = [t.requires_grad_() for t in (x, dt, A, B, C, D)]
    probe = rand(b, seqlen, h, p)

    y = ssd_chunked(x, dt, A, B, C, chunk, D=D, seq_idx=seq_idx)
    ref = naive_ssd(x, dt, A, B, C, D, seq_idx)
    assert _close(y, ref) < 1e-12
    for name, got, want in zip(
        ["x", "dt", "A", "B", "C", "D"], _grads(y, inputs, probe), _grads(ref, inputs, probe), strict=True
    ):
        assert _close(got, want) < 1e-10, name


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2), st.integers(1, 12), st.integers(2, 5), st.data())
def test_torch_conv_resets_at_documents(b: int, seqlen: int, width: int, data) -> None:
    seq_idx = random_seq_idx(data.draw, b, seqlen)
    gen = torch.Generator().manual_seed(seqlen * 10 + width)
    x = torch.randn(b, seqlen, 3, generator=gen, dtype=F64)
    w, bias = torch.randn(3, width, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64)
    torch.testing.assert_close(causal_conv1d_torch(x, w, bias, seq_idx), naive_conv(x, w, bias, seq_idx))


def naive_mixer(m: MambaMixer, u: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """The mixer written out from its definition with the per-step pieces above."""
    c, s = m.core, m.core.shape
    z, xbc, dt = m.in_proj(u).split([s.d_inner, s.conv_dim, s.nheads], dim=-1)
    xbc = F.silu(naive_conv(xbc, c.conv_weight, c.conv_bias, seq_idx))
    x, B, C = xbc.split([s.d_inner, s.ngroups * s.d_state, s.ngroups * s.d_state], dim=-1)
    y = naive_ssd(
        x.unflatten(-1, (s.nheads, s.headdim)),
        F.softplus(dt + c.dt_bias),
        -torch.exp(c.A_log),
        B.unflatten(-1, (s.ngroups, s.d_state)),
        C.unflatten(-1, (s.ngroups, s.d_state)),
        c.D,
        seq_idx,
    ).flatten(-2)
    gated = (y * F.silu(z)).unflatten(-1, (s.ngroups, -1))
    normed = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + s.norm_eps)
    return m.out_proj(normed.flatten(-2) * c.norm_weight)


def test_reference_mixer_matches_its_definition() -> None:
    torch.manual_seed(0)
    m = MambaMixer(12, expand=2, headdim=4, d_state=3, ngroups=2, chunk_size=4, path="reference").double()
    with torch.no_grad():  # move the parameters off their initial values so every one matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    u = torch.randn(2, 11, 12, dtype=F64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 3 + [1] * 8, [0] * 5 + [2] * 2 + [3] * 4])
    params = [u, *m.parameters()]
    for ids in (None, seq_idx):
        y, ref = m(u, ids), naive_mixer(m, u, ids)
        assert _close(y, ref) < 1e-12
        probe = torch.randn_like(ref)
        for got, want in zip(_grads(y, params, probe), _grads(ref, params, probe), strict=True):
            assert _close(got, want) < 1e-10

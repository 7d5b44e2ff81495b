"""MambaMixer as a module: paths and their errors, packed rows, parameters, shapes and dtypes."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from nam_mixers import MambaCore, MambaMixer
from nam_mixers.ops.ssd import backends

TINY = {"hidden_size": 16, "headdim": 8, "d_state": 4, "ngroups": 2, "chunk_size": 8}


def _mixer(**kw) -> MambaMixer:
    torch.manual_seed(0)
    return MambaMixer(**(TINY | kw)).double()


@pytest.fixture
def fresh_imports():
    """Availability is cached per process; let a test see a changed environment."""
    backends.import_error.cache_clear()
    yield
    backends.import_error.cache_clear()


def test_auto_resolves_to_reference_on_cpu() -> None:
    m = _mixer()
    assert m.path == "auto" and m.resolved_path == "reference"
    assert _mixer(path="reference").resolved_path == "reference"


def test_unknown_path_lists_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown path 'fast'; accepted: auto, fused, split, reference"):
        MambaMixer(**TINY, path="fast")
    m = _mixer()
    with pytest.raises(ValueError, match="unknown path"):
        m.path = "fast"
    assert m.path == "auto"


@pytest.mark.parametrize("path", ["fused", "split"])
def test_missing_mamba_ssm_is_named(path: str, monkeypatch, fresh_imports) -> None:
    # None in sys.modules makes an import fail, even of a module imported before
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.ssd_combined", None)
    with pytest.raises(RuntimeError, match=rf"path='{path}' needs mamba-ssm .*README.md"):
        MambaMixer(**TINY, path=path)


def test_missing_causal_conv1d_is_named(monkeypatch, fresh_imports) -> None:
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)
    if backends.import_error("mamba_ssm.ops.triton.ssd_combined") is not None:
        pytest.skip("mamba-ssm is absent, so the fused path fails on it first")
    with pytest.raises(RuntimeError, match=r"path='fused' needs causal-conv1d \(its CUDA conv op"):
        MambaMixer(**TINY, path="fused")


def test_split_path_refuses_cpu_tensors_outside_the_interpreter(monkeypatch) -> None:
    if backends.import_error("mamba_ssm.ops.triton.ssd_combined") is not None:
        pytest.skip("mamba-ssm is absent: the constructor already refuses these paths")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"path='split' runs its Triton kernels on CUDA tensors"):
        _ = MambaMixer(**TINY, path="split").resolved_path


def test_packed_rows_equal_documents_run_alone() -> None:
    m = _mixer()
    lengths = [3, 1, 9, 2, 5]  # shorter than the conv and longer than a chunk, across chunk edges
    docs = [torch.randn(1, n, 16, dtype=torch.float64, requires_grad=True) for n in lengths]
    packed = torch.cat(docs, dim=1)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    y = m(packed, seq_idx)
    alone = torch.cat([m(d) for d in docs], dim=1)
    torch.testing.assert_close(y, alone, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(y)
    g_packed = torch.autograd.grad((y * probe).sum(), [*docs, *m.parameters()])
    g_alone = torch.autograd.grad((alone * probe).sum(), [*docs, *m.parameters()])
    for a, b in zip(g_packed, g_alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and without seq_idx the documents do leak into each other
    assert not torch.allclose(m(packed), alone)


def test_seq_idx_is_validated() -> None:
    m, u = _mixer(), torch.randn(2, 6, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"seq_idx must be an integer tensor \[batch, seq\] = \(2, 6\)"):
        m(u, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        m(u, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="non-decreasing"):
        m(u, torch.tensor([[0, 0, 1, 1, 0, 0], [0] * 6]))


def test_input_shapes_are_validated() -> None:
    m = _mixer()
    with pytest.raises(ValueError, match=r"expected \[batch, seq, 16\], got \(2, 6, 8\)"):
        m(torch.randn(2, 6, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"in_proj output \[batch, seq, 84\]"):
        m.core(torch.randn(2, 6, 80, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"nheads \(6\) must be a multiple of ngroups \(4\)"):
        MambaCore(6, ngroups=4)
    with pytest.raises(ValueError, match=r"must be a positive multiple of headdim \(64\)"):
        MambaMixer(48, expand=1)


def test_parameters_and_their_initialisation() -> None:
    m = MambaMixer(64, expand=2, headdim=16, d_state=8, ngroups=2)
    c = m.core
    s = c.shape
    assert (s.nheads, s.d_inner, s.conv_dim) == (8, 128, 128 + 2 * 2 * 8)
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {
        "core.conv_weight": (s.conv_dim, 4),
        "core.conv_bias": (s.conv_dim,),
        "core.dt_bias": (8,),
        "core.A_log": (8,),
        "core.D": (8,),
        "core.norm_weight": (128,),
        "in_proj.weight": (2 * 128 + 2 * 2 * 8 + 8, 64),
        "out_proj.weight": (64, 128),
    }
    dt = F.softplus(c.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert c.A_log.min() >= 0 and c.A_log.max() <= math.log(16) + 1e-6
    assert torch.equal(c.D, torch.ones(8)) and torch.equal(c.norm_weight, torch.ones(128))
    assert c.conv_weight.abs().max() <= 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_runs_in_low_precision_close_to_float64(dtype: torch.dtype) -> None:
    m64 = _mixer()
    m = MambaMixer(**TINY).to(dtype)
    m.load_state_dict(m64.state_dict())
    u = torch.randn(2, 13, 16, dtype=torch.float64)
    y, ref = m(u.to(dtype)), m64(u)
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_every_parameter_gets_a_gradient() -> None:
    m = _mixer()
    m(torch.randn(2, 11, 16, dtype=torch.float64)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_auto_prefers_kernels_on_cuda_as_installed(monkeypatch, fresh_imports) -> None:
    """resolve_path only looks at the device type and what imports, so CUDA resolution is testable here."""
    cuda = torch.device("cuda")
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)
    has_mamba = backends.import_error("mamba_ssm.ops.triton.ssd_combined") is None
    assert backends.resolve_path("auto", cuda) == ("split" if has_mamba else "reference")
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.ssd_combined", None)
    backends.import_error.cache_clear()
    assert backends.resolve_path("auto", cuda) == "reference"


def test_core_split_by_heads_equals_the_whole() -> None:
    """Tensor parallelism's view: two cores holding half the heads and groups each, fed their parts
    of [z, x, B, C, dt], give the two halves of the whole core's output (the norm is per group)."""
    torch.manual_seed(3)
    nheads, headdim, d_state, ngroups, ranks = 4, 3, 5, 2, 2
    whole = MambaCore(nheads, headdim=headdim, d_state=d_state, ngroups=ngroups, chunk_size=4).double()
    with torch.no_grad():
        for p in whole.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s = whole.shape
    zxbcdt = torch.randn(2, 9, s.d_in_proj, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    z, x, B, C, dt = zxbcdt.split([s.d_inner, s.d_inner, ngroups * d_state, ngroups * d_state, nheads], -1)
    cw_x, cw_B, cw_C = whole.conv_weight.split([s.d_inner, ngroups * d_state, ngroups * d_state])
    cb_x, cb_B, cb_C = whole.conv_bias.split([s.d_inner, ngroups * d_state, ngroups * d_state])

    def part(t: torch.Tensor, r: int, dim: int = -1) -> torch.Tensor:
        return t.chunk(ranks, dim=dim)[r]

    halves = []
    for r in range(ranks):
        local = MambaCore(
            nheads // ranks, headdim=headdim, d_state=d_state, ngroups=ngroups // ranks, chunk_size=4
        )
        local = local.double()
        with torch.no_grad():
            local.conv_weight.copy_(torch.cat([part(cw_x, r, 0), part(cw_B, r, 0), part(cw_C, r, 0)]))
            local.conv_bias.copy_(torch.cat([part(cb_x, r, 0), part(cb_B, r, 0), part(cb_C, r, 0)]))
            for name in ("dt_bias", "A_log", "D", "norm_weight"):
                getattr(local, name).copy_(part(getattr(whole, name), r, 0))
        local_in = torch.cat([part(t, r) for t in (z, x, B, C, dt)], dim=-1)
        halves.append(local(local_in, seq_idx))
    torch.testing.assert_close(torch.cat(halves, dim=-1), whole(zxbcdt, seq_idx), rtol=1e-12, atol=1e-12)

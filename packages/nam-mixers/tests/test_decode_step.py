"""Incremental decoding of the cores: a prefill then one token per step gives the outputs of one
forward over all the tokens, and a document start inside the prefill leaves no trace of the
earlier document in the state."""

from __future__ import annotations

import pytest
import torch

from nam_mixers import M2RNNCore, Mamba3Core, MambaCore

PREFILL, STEPS = 5, 4


def _cores() -> list[tuple[torch.nn.Module, list[int]]]:
    torch.manual_seed(0)
    mamba = MambaCore(4, headdim=4, d_state=8, ngroups=2, chunk_size=4, path="reference", dtype=torch.float64)
    m2rnn = M2RNNCore(4, head_dim_k=4, head_dim_v=3, num_qk_heads=2, path="reference", dtype=torch.float64)
    mamba3 = Mamba3Core(
        4, headdim=4, d_state=8, ngroups=2, chunk_size=4, path="reference", dtype=torch.float64
    )
    return [
        (mamba, [mamba.shape.d_in_proj]),
        (m2rnn, [2 * 2 * 4, 4 * 7]),
        (mamba3, [mamba3.shape.d_in_proj, mamba3.shape.n_angles]),
    ]


def _with_random_params(core: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in core.parameters():  # away from the init's identities (W = I, D = 1)
            p.add_(0.3 * torch.randn_like(p))
    return core


@pytest.mark.parametrize("which", [0, 1, 2], ids=["mamba", "m2rnn", "mamba3"])
@pytest.mark.parametrize("boundary", [None, 3], ids=["one-document", "document-start-in-prefill"])
def test_prefill_then_steps_equals_forward(which: int, boundary: int | None) -> None:
    core, widths = _cores()[which]
    core = _with_random_params(core)
    n = PREFILL + STEPS
    inputs = [torch.randn(2, n, w, dtype=torch.float64) for w in widths]
    seq_idx = None
    if boundary is not None:
        seq_idx = (torch.arange(n) >= boundary).to(torch.int32).expand(2, n).contiguous()
    full = core(*inputs, seq_idx)
    y, state = core.prefill(
        *(x[:, :PREFILL] for x in inputs), None if seq_idx is None else seq_idx[:, :PREFILL]
    )
    torch.testing.assert_close(y, full[:, :PREFILL])
    for t in range(PREFILL, n):
        y, state = core.step(*(x[:, t : t + 1] for x in inputs), state)
        torch.testing.assert_close(y, full[:, t : t + 1], rtol=1e-6, atol=1e-6)  # the epilogue is float32

"""The M2RNN module: shapes, initialisation, packed rows, and the Triton path against the reference."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # see test_m2rnn_triton.py

from nam_mixers import M2RNN
from nam_mixers.ops.conv import causal_conv1d_torch
from nam_mixers.ops.m2rnn import M2RNNKernelConfig, PassConfig

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
TINY = {"hidden_size": 24, "num_heads": 4, "head_dim_k": 16, "head_dim_v": 4, "num_qk_heads": 2}


def test_shapes_and_initialisation() -> None:
    torch.manual_seed(0)
    m = M2RNN(**TINY, path="reference")
    y = m(torch.randn(2, 7, 24))
    assert y.shape == (2, 7, 24)
    core = m.core
    assert torch.equal(core.W, torch.eye(4).expand(4, 4, 4))
    f0 = core.forget_gate(torch.zeros(1, 1, 4))
    assert ((f0 >= math.exp(-0.1) - 1e-6) & (f0 <= math.exp(-1e-3) + 1e-6)).all()
    assert m.in_proj.out_features == 4 * (2 * 4 + 1) and m.qk_proj.out_features == 2 * 2 * 16


def test_causal_conv_matches_conv1d() -> None:
    gen = torch.Generator().manual_seed(1)
    x, w, b = (
        torch.randn(2, 9, 5, generator=gen),
        torch.randn(5, 4, generator=gen),
        torch.randn(5, generator=gen),
    )
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w.unsqueeze(1), b, groups=5).transpose(1, 2)
    torch.testing.assert_close(causal_conv1d_torch(x, w, b, None), ref)


def test_packed_rows_equal_separate_documents() -> None:
    torch.manual_seed(2)
    m = M2RNN(**TINY, path="reference").double()
    x = torch.randn(1, 10, 24, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 6])
    packed = m(x, seq_idx=seq_idx)
    separate = torch.cat([m(x[:, :4]), m(x[:, 4:])], dim=1)
    torch.testing.assert_close(packed, separate)
    assert not torch.allclose(m(x)[:, 4:], separate[:, 4:])  # without seq_idx the state carries over


def test_triton_path_matches_reference() -> None:
    torch.manual_seed(3)
    cfg = M2RNNKernelConfig(forward=PassConfig(4, 16, 1), backward=PassConfig(2, 16, 1), chunk=4)
    ref = M2RNN(**TINY, path="reference")
    tri = M2RNN(**TINY, path="triton", kernel_config=cfg)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 24)
    seq_idx = torch.tensor([[0] * 5 + [1] * 4, [2] * 9])
    outs = []
    for m in (ref, tri):
        y = m(x, seq_idx=seq_idx)
        y.pow(2).sum().backward()
        outs.append((y, {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for name, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="path must be one of"):
        M2RNN(**TINY, path="fast")
    with pytest.raises(ValueError, match="multiple of num_qk_heads"):
        M2RNN(**TINY | {"num_qk_heads": 3})
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, hidden\]"):
        M2RNN(**TINY)(torch.randn(7, 24))

"""The per-step reference: gradients by gradcheck, packed-row semantics, input validation."""

from __future__ import annotations

import pytest
import torch

from nam_mixers.ops.m2rnn import m2rnn_scan, m2rnn_scan_reference


def _inputs(b=2, s=6, g=1, h=2, k=3, v=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {
        "q": rnd(b, s, g, k),
        "k": rnd(b, s, g, k),
        "v": rnd(b, s, h, v),
        "f": torch.rand(b, s, h, generator=gen, dtype=dtype) * 0.9 + 0.05,
        "w": torch.eye(v, dtype=dtype) + 0.3 * rnd(h, v, v),
        "h0": rnd(b, h, k, v),
    }


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("g", [1, 2])
def test_reference_gradcheck(packed: bool, g: int) -> None:
    x = _inputs(g=g, h=4)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]]) if packed else None
    names = list(x)
    args = [x[n].requires_grad_() for n in names]

    def fn(*a):
        y, ht = m2rnn_scan_reference(*a, seq_idx=seq_idx)
        return y, ht

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_packed_rows_equal_separate_documents() -> None:
    x = _inputs(b=1, s=7, h=2, seed=1)
    seq_idx = torch.tensor([[3, 3, 3, 8, 8, 8, 8]])
    y, ht = m2rnn_scan_reference(x["q"], x["k"], x["v"], x["f"], x["w"], x["h0"], seq_idx=seq_idx)
    cut = 3
    first = {n: x[n][:, :cut] for n in ("q", "k", "v", "f")}
    second = {n: x[n][:, cut:] for n in ("q", "k", "v", "f")}
    y1, _ = m2rnn_scan_reference(**first, w=x["w"], h0=x["h0"])
    y2, ht2 = m2rnn_scan_reference(**second, w=x["w"])  # the second document starts from zero
    torch.testing.assert_close(y, torch.cat([y1, y2], dim=1))
    torch.testing.assert_close(ht, ht2)


def test_initial_state_and_final_state_chain() -> None:
    # Running [0, s) in two pieces, the second starting from the first's final state, is one run.
    x = _inputs(b=2, s=8, seed=2)
    y, ht = m2rnn_scan_reference(x["q"], x["k"], x["v"], x["f"], x["w"], x["h0"])
    a = {n: x[n][:, :5] for n in ("q", "k", "v", "f")}
    c = {n: x[n][:, 5:] for n in ("q", "k", "v", "f")}
    ya, hta = m2rnn_scan_reference(**a, w=x["w"], h0=x["h0"])
    yc, htc = m2rnn_scan_reference(**c, w=x["w"], h0=hta)
    torch.testing.assert_close(y, torch.cat([ya, yc], dim=1))
    torch.testing.assert_close(ht, htc)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"f": torch.rand(2, 6, 3)}, "forget gate f must be"),
        ({"w": torch.rand(2, 3, 3)}, "W must be"),
        ({"k": torch.rand(2, 6, 1, 4)}, "k must have q's shape"),
        ({"h0": torch.rand(2, 2, 3, 3)}, "initial state must be"),
        ({"q": torch.rand(2, 6, 3), "k": torch.rand(2, 6, 3)}, "q must be"),
    ],
)
def test_bad_shapes_are_named(change: dict, message: str) -> None:
    x = _inputs(dtype=torch.float32) | change
    with pytest.raises(ValueError, match=message):
        m2rnn_scan(**x, path="reference")


def test_bad_seq_idx_and_group_count() -> None:
    x = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="seq_idx must be int32 or int64"):
        m2rnn_scan(**x, seq_idx=torch.zeros(2, 6), path="reference")
    y = _inputs(g=2, h=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of q/k heads"):
        m2rnn_scan(**y, path="reference")
    with pytest.raises(ValueError, match="path must be one of"):
        m2rnn_scan(**x, path="cuda")

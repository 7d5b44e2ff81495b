"""The experts' Triton kernels against their PyTorch references, on CPU under the Triton interpreter
(set before the kernels' module is first imported, which nam_mixers.ops.moe does lazily)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nam_mixers.ops.moe import sum_pairs, weighted_swiglu

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _swiglu_case(
    t: int, f: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(t, 2 * f, generator=gen) * 2).to(DEVICE, dtype)
    probs = torch.rand(t, generator=gen).to(DEVICE)  # the router's weights stay fp32
    grad = torch.randn(t, f, generator=gen).to(DEVICE, dtype)
    return h, probs, grad


def _forward_backward(
    path: str, h: torch.Tensor, probs: torch.Tensor, grad: torch.Tensor
) -> list[torch.Tensor]:
    h, probs = h.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    y = weighted_swiglu(h, probs, path=path)
    y.backward(grad)
    return [y, h.grad, probs.grad]


@pytest.mark.parametrize(
    ("t", "f"),
    [(37, 300), (16, 256), (5, 7)],
    ids=["ragged rows, two column blocks", "exact tiles", "tiny"],
)
def test_weighted_swiglu_kernel_matches_the_reference_fp32(t: int, f: int) -> None:
    h, probs, grad = _swiglu_case(t, f, torch.float32)
    ours = _forward_backward("triton", h, probs, grad)
    ref = _forward_backward("reference", h, probs, grad)
    for name, a, b in zip(("output", "h grad", "probs grad"), ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_weighted_swiglu_kernel_in_bf16_rounds_once() -> None:
    """bf16 activations, fp32 routing weights: the kernel keeps every intermediate in fp32 and rounds
    each bf16 output once, so every element is within one bf16 step (2^-7 relative: the GPU rounds to
    nearest, the Triton interpreter truncates) of the exact value; the fp32 routing weights'
    gradient is exact to fp32 summation."""
    h, probs, grad = _swiglu_case(64, 96, torch.bfloat16, seed=1)
    exact = _forward_backward("reference", h.double(), probs.double(), grad.double())
    ours = _forward_backward("triton", h, probs, grad)
    ref = _forward_backward("reference", h, probs, grad)
    for name, a, b, e in zip(("output", "h grad", "probs grad"), ours, ref, exact, strict=True):
        assert a.dtype == b.dtype, name
        bound = (2**-7 if a.dtype == torch.bfloat16 else 1e-5) * e.abs() + 1e-6
        assert ((a.double() - e).abs() <= bound).all(), name
        # the reference rounds its intermediates to bf16 too: the same function up to those roundings
        scale = e.abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=0.0, atol=2e-2 * scale, msg=name)


def test_weighted_swiglu_without_tokens() -> None:
    h, probs, grad = _swiglu_case(0, 8, torch.float32)
    y, dh, dp = _forward_backward("triton", h, probs, grad)
    assert y.shape == (0, 8) and dh.shape == (0, 16) and dp.shape == (0,)


@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(9, 4, 1500), (6, 1, 64), (0, 2, 32)])
def test_sum_pairs_kernel_matches_the_reference(tokens: int, top_k: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(tokens * top_k, hidden, generator=gen).to(DEVICE, torch.bfloat16)
    inverse = torch.randperm(tokens * top_k, generator=gen).to(DEVICE)
    ours = sum_pairs(rows, inverse, top_k, path="triton")
    ref = sum_pairs(rows, inverse, top_k, path="reference")
    assert ours.dtype == ref.dtype == torch.bfloat16 and ours.shape == (tokens, hidden)
    # both add in fp32 and round once; only the order of the top_k additions may differ
    torch.testing.assert_close(ours.float(), ref.float(), rtol=8e-3, atol=1e-2)
    exact = rows.double().index_select(0, inverse).view(tokens, top_k, hidden).sum(1)
    assert ((ours.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-6).all()


def test_paths_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    h = torch.zeros(2, 4)
    with pytest.raises(
        ValueError, match=r"moe op path must be one of \('auto', 'triton', 'reference'\), got 'fused'"
    ):
        weighted_swiglu(h, torch.zeros(2), path="fused")
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            sum_pairs(h, torch.arange(2), 1, path="triton")
        # auto off CUDA is the reference, whatever the environment
        torch.testing.assert_close(weighted_swiglu(h, torch.ones(2)), torch.zeros(2, 2))

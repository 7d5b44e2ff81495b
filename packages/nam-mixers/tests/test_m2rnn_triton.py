"""The Triton forward and backward against the reference, on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before the kernel modules are first imported (triton.jit decides at
decoration); nam_mixers imports them lazily, at the first Triton call, so setting it here suffices.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nam_mixers.ops.m2rnn import M2RNNKernelConfig, PassConfig, m2rnn_scan, m2rnn_scan_reference, resolve_path

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
# triton 3.6's interpreter converts 1-element arrays to ints, which numpy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


CASES = {
    # name: (B, S, G, H, K, V, h0, packed, forward (block_t, block_k, warps, prefetch),
    #        backward (block_t, block_k, warps, prefetch), chunk, dqk)
    "NAM56R head (K 64, V 16)": (
        1,
        9,
        1,
        2,
        64,
        16,
        True,
        False,
        (4, 64, 4, True),
        (2, 32, 2, True),
        4,
        "atomic",
    ),
    "one row block": (1, 11, 1, 3, 16, 16, False, False, (4, 16, 1, False), (2, 16, 1, True), 4, "per_head"),
    "K split over row blocks, V padded": (
        2,
        13,
        1,
        3,
        20,
        5,
        True,
        True,
        (4, 16, 1, False),
        (2, 16, 2, False),
        4,
        "atomic",
    ),
    "two q/k groups, chunk > seq": (
        1,
        7,
        2,
        4,
        8,
        3,
        True,
        False,
        (4, 16, 1, True),
        (4, 32, 1, True),
        8,
        "per_head",
    ),
    "blocks not dividing seq, packed": (
        2,
        10,
        1,
        2,
        24,
        8,
        False,
        True,
        (3, 16, 1, True),
        (3, 16, 1, True),
        6,
        "atomic",
    ),
    # Fewer than 16 rows per program: the state products run as multiply-and-sum, not tl.dot.
    "8 rows per program, packed + h0": (
        2,
        9,
        1,
        2,
        12,
        5,
        True,
        True,
        (3, 8, 1, True),
        (3, 8, 1, False),
        6,
        "per_head",
    ),
    "4 rows, two q/k groups, packed + h0": (
        1,
        9,
        2,
        4,
        6,
        5,
        True,
        True,
        (3, 4, 1, False),
        (3, 4, 1, True),
        6,
        "atomic",
    ),
    "2 rows, V not padded, packed + h0": (
        2,
        9,
        1,
        2,
        5,
        16,
        True,
        True,
        (3, 2, 1, True),
        (3, 2, 2, True),
        6,
        "per_head",
    ),
    "1 row, packed + h0": (1, 10, 1, 2, 3, 4, True, True, (4, 1, 1, True), (2, 1, 1, False), 4, "atomic"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case: str) -> None:
    b, s, g, h, k, v, with_h0, packed, fwd, bwd, chunk, dqk = CASES[case]
    gen = torch.Generator().manual_seed(len(case))

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE).requires_grad_()

    x = {
        "q": rnd(b, s, g, k, scale=0.5),
        "k": rnd(b, s, g, k),
        "v": rnd(b, s, h, v),
        "f": torch.rand(b, s, h, generator=gen).mul(0.9).add(0.05).to(DEVICE).requires_grad_(),
        "w": (torch.eye(v) + 0.3 * torch.randn(h, v, v, generator=gen)).to(DEVICE).requires_grad_(),
    }
    if with_h0:
        x["h0"] = rnd(b, h, k, v)
    seq_idx = None
    if (
        packed
    ):  # documents of varied lengths, including a start inside the first chunk and one at a chunk edge
        seq_idx = torch.cumsum(torch.rand(b, s, generator=gen) < 0.3, dim=1).to(DEVICE)
        seq_idx[:, chunk % s] += 7
        seq_idx[:, chunk % s :] += 7
    fwd_cfg = PassConfig(fwd[0], fwd[1], fwd[2], prefetch=fwd[3])
    cfg = M2RNNKernelConfig(
        forward=fwd_cfg, backward=PassConfig(bwd[0], bwd[1], bwd[2], prefetch=bwd[3]), chunk=chunk, dqk=dqk
    )
    y, ht = m2rnn_scan(**x, seq_idx=seq_idx, path="triton", config=cfg)
    yr, htr = m2rnn_scan_reference(**x, seq_idx=seq_idx)
    assert _rel(y, yr) < 1e-5
    assert _rel(ht, htr) < 1e-5
    # from the test's generator: torch's global one is seeded differently in every process
    dy, dht = (torch.randn(t.shape, generator=gen).to(DEVICE, t.dtype) for t in (yr, htr))
    grads = torch.autograd.grad((y * dy).sum() + (ht * dht).sum(), list(x.values()))
    grads_ref = torch.autograd.grad((yr * dy).sum() + (htr * dht).sum(), list(x.values()))
    for name, got, ref in zip(x, grads, grads_ref, strict=True):
        assert _rel(got, ref) < 1e-5, name


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_default_config_matches_reference(dtype: torch.dtype, tol: float) -> None:
    """The pinned default launch configuration (config=None, what the module and the GPU use) against
    the float64 reference, forward and backward. Under the interpreter the only departure from the GPU
    is in 16-bit inputs: the dot runs in "tf32" and tanh exactly, as the interpreter cannot run the
    GPU's "bf16" dot or tanh.approx (bench/gpu.sh checks those)."""
    cfg = M2RNNKernelConfig()
    # sequence long enough for a second, partial chunk and a partial last block in both passes;
    # K over two row blocks of 16 (the default; the second padded), V padded
    b, s, g, h, k, v = 1, cfg.chunk + cfg.chunk // 2 + 1, 1, 2, 20, 5
    assert s % cfg.forward.block_t and s % cfg.backward.block_t
    assert cfg.backward.block_k < k
    gen = torch.Generator().manual_seed(7)

    def rnd(*shape: int, scale: float = 1.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dt).requires_grad_()

    x = {
        "q": rnd(b, s, g, k, scale=0.5),
        "k": rnd(b, s, g, k),
        "v": rnd(b, s, h, v),
        "f": torch.rand(b, s, h, generator=gen).mul(0.9).add(0.05).to(DEVICE).requires_grad_(),
        "w": (torch.eye(v) + 0.3 * torch.randn(h, v, v, generator=gen)).to(DEVICE, dtype).requires_grad_(),
        "h0": rnd(b, h, k, v, dt=torch.float32),
    }
    seq_idx = torch.zeros(b, s, dtype=torch.long, device=DEVICE)
    # documents start inside each chunk, and the state crosses the chunk edge (its checkpoint is used)
    seq_idx[:, cfg.chunk // 2 + 1 :] = 1
    seq_idx[:, cfg.chunk + 5 :] = 2
    y, ht = m2rnn_scan(**x, seq_idx=seq_idx, path="triton")
    x64 = {name: t.detach().double().requires_grad_() for name, t in x.items()}
    yr, htr = m2rnn_scan_reference(**x64, seq_idx=seq_idx)
    assert y.dtype == dtype and ht.dtype == torch.float32
    assert _rel(y, yr) < tol
    assert _rel(ht, htr) < tol
    # from the test's generator: torch's global one is seeded differently in every process
    dy, dht = (torch.randn(t.shape, generator=gen).to(DEVICE, t.dtype) for t in (yr, htr))
    grads = torch.autograd.grad((y * dy.to(dtype)).sum() + (ht * dht.float()).sum(), list(x.values()))
    grads_ref = torch.autograd.grad((yr * dy).sum() + (htr * dht).sum(), list(x64.values()))
    for name, got, ref in zip(x, grads, grads_ref, strict=True):
        assert got.dtype == x[name].dtype, name
        assert _rel(got, ref) < tol, name


def test_unused_final_state_and_no_output_grad() -> None:
    # Only y in the loss (dL/dh_T is None), and only h_T in the loss (dL/dy is None).
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 5, 1, 16, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(1, 5, 2, 16, generator=gen).requires_grad_()
    f = torch.rand(1, 5, 2, generator=gen).requires_grad_()
    w = torch.eye(16).repeat(2, 1, 1).requires_grad_()
    cfg = M2RNNKernelConfig(forward=PassConfig(4, 16, 1), backward=PassConfig(4, 16, 1), chunk=4)
    ins = (q, k, v, f, w)
    for pick in (0, 1):
        out = m2rnn_scan(*ins, path="triton", config=cfg)[pick].sum()
        ref = m2rnn_scan_reference(*ins)[pick].sum()
        wants = torch.autograd.grad(ref, ins, allow_unused=True)  # h_T does not depend on q
        for x, got, want in zip(ins, torch.autograd.grad(out, ins), wants, strict=True):
            want = torch.zeros_like(x) if want is None else want
            assert (got - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1.0)


def test_config_validation() -> None:
    assert PassConfig().block_k == 16  # fewer rows lost fwd+bwd on the H200 (config.py)
    for bad in (0, 12):
        with pytest.raises(ValueError, match="block_k must be a power of two"):
            PassConfig(block_k=bad)
    with pytest.raises(ValueError, match="num_warps must be one of"):
        PassConfig(num_warps=3)
    with pytest.raises(
        ValueError, match=r"chunk \(24\) must be a positive multiple of forward.block_t \(16\)"
    ):
        M2RNNKernelConfig(forward=PassConfig(block_t=16), backward=PassConfig(block_t=8), chunk=24)
    with pytest.raises(
        ValueError, match=r"chunk \(20\) must be a positive multiple of backward.block_t \(8\)"
    ):
        M2RNNKernelConfig(forward=PassConfig(block_t=4), backward=PassConfig(block_t=8), chunk=20)
    with pytest.raises(ValueError, match="precision must be one of"):
        PassConfig(precision="fp8")
    with pytest.raises(ValueError, match="dqk must be one of"):
        M2RNNKernelConfig(dqk="sum")
    assert PassConfig().dot_precision(input_is_fp32=True, on_cuda=True) == "ieee"
    assert PassConfig().dot_precision(input_is_fp32=False, on_cuda=True) == "bf16"
    assert PassConfig().dot_precision(input_is_fp32=False, on_cuda=False) == "tf32"
    assert PassConfig(precision="tf32x3").dot_precision(input_is_fp32=True, on_cuda=False) == "tf32x3"
    with pytest.raises(ValueError, match="precision='bf16' needs CUDA"):
        PassConfig(precision="bf16").dot_precision(input_is_fp32=False, on_cuda=False)
    assert PassConfig().use_fast_tanh(input_is_fp32=False, on_cuda=True)
    assert not PassConfig().use_fast_tanh(input_is_fp32=False, on_cuda=False)
    assert not PassConfig().use_fast_tanh(input_is_fp32=True, on_cuda=True)
    with pytest.raises(ValueError, match="fast_tanh=True needs CUDA"):
        PassConfig(fast_tanh=True).use_fast_tanh(input_is_fp32=False, on_cuda=False)


def test_launcher_rejects_unaligned_chunk() -> None:
    from nam_mixers.ops.m2rnn.forward import m2rnn_forward
    from nam_mixers.ops.m2rnn.shapes import check_scan_inputs

    q = torch.randn(1, 8, 1, 16)
    v, f, w = torch.randn(1, 8, 2, 16), torch.rand(1, 8, 2), torch.randn(2, 16, 16)
    dims = check_scan_inputs(q, q, v, f, w, None, None)
    with pytest.raises(ValueError, match=r"chunk \(6\) must be a multiple of block_t \(4\)"):
        m2rnn_forward(q, q, v, f, w, None, None, dims, PassConfig(block_t=4), 6)


def test_resolve_path() -> None:
    assert resolve_path("auto", torch.device("cpu")) == "reference"
    assert resolve_path("reference", torch.device("cuda")) == "reference"
    with pytest.raises(ValueError, match="path must be one of"):
        resolve_path("fused", torch.device("cpu"))

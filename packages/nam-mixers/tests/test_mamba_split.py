"""The split path (mamba-ssm's Triton SSD scan and gated RMSNorm) against the reference path.

On a CPU machine the Triton kernels run under the Triton interpreter at tiny sizes. That needs:
TRITON_INTERPRET=1 before the kernels are first imported (triton.jit decides at decoration), and
MAMBA_DETERMINISTIC=1 so that mamba-ssm gives each kernel a single config (its autotuner would
otherwise benchmark the configs through a GPU driver). mamba-ssm is not in uv.lock; the nox
`mixers` session installs it and sets NAM_REQUIRE_MAMBA_SSM=1, which turns the skip below into a
failure so CI cannot silently stop running this comparison.
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MAMBA_DETERMINISTIC", "1")

from nam_mixers import MambaMixer  # noqa: E402 (after the environment above)
from nam_mixers.ops.ssd.backends import import_error  # noqa: E402

with warnings.catch_warnings():  # deterministic mode announces itself as the kernels are defined
    warnings.filterwarnings("ignore", "Deterministic mode", UserWarning)
    _missing = import_error("mamba_ssm.ops.triton.ssd_combined")
if _missing is not None:
    if os.environ.get("NAM_REQUIRE_MAMBA_SSM") == "1":
        raise RuntimeError(f"NAM_REQUIRE_MAMBA_SSM=1 but mamba-ssm does not import: {_missing}")
    pytest.skip(
        f"mamba-ssm does not import ({_missing}); the split path is untested here", allow_module_level=True
    )

from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: E402

from nam_mixers.ops.ssd import ssd_chunked  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# triton 3.6's interpreter converts 1-element arrays to ints, which numpy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _cpu_launch_shims():
    """mamba-ssm's launchers assume CUDA tensors: they enter torch.cuda.device(t.device.index),
    which torch 2.11 rejects for a CPU tensor's index None although its docs call it a no-op, and
    read the SM count for the backward grid. On CPU, make those two a no-op and a fixed count."""
    if ON_GPU:
        yield
        return
    device, properties = torch.cuda.device, torch.cuda.get_device_properties
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext() if d is None else device(d))
        mp.setattr(
            torch.cuda,
            "get_device_properties",
            lambda d=None: (
                types.SimpleNamespace(multi_processor_count=4)
                if torch.device(d).type == "cpu"
                else properties(d)
            ),
        )
        yield


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


PACKED = [[0] * 7 + [1] * 20 + [2] * 2 + [3] * 8, [0] * 37]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_triton_scan_matches_chunked_reference(packed: bool) -> None:
    """mamba_chunk_scan_combined against ssd_chunked, float32, values and gradients."""
    torch.manual_seed(1)
    b, seqlen, h, g, p, n, chunk = 2, 37, 4, 2, 8, 16, 16
    kw = {"device": DEVICE}
    x, B, C = (
        torch.randn(b, seqlen, h, p, **kw),
        torch.randn(b, seqlen, g, n, **kw),
        torch.randn(b, seqlen, g, n, **kw),
    )
    dt_raw = torch.randn(b, seqlen, h, **kw)
    A, D, dt_bias = -torch.rand(h, **kw) - 0.5, torch.randn(h, **kw), torch.randn(h, **kw)
    seq_idx = torch.tensor(PACKED, dtype=torch.int32, device=DEVICE) if packed else None
    inputs = [t.requires_grad_() for t in (x, dt_raw, A, B, C, D, dt_bias)]
    probe = torch.randn(b, seqlen, h, p, **kw)

    y = mamba_chunk_scan_combined(
        x, dt_raw, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq_idx
    )
    dt = torch.nn.functional.softplus(dt_raw + dt_bias)
    ref = ssd_chunked(x, dt, A, B, C, chunk, D=D, seq_idx=seq_idx)
    assert _rel(y, ref) < 1e-5
    grads = torch.autograd.grad((y * probe).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * probe).sum(), inputs)
    for name, got, want in zip(["x", "dt", "A", "B", "C", "D", "dt_bias"], grads, ref_grads, strict=True):
        assert _rel(got, want) < 1e-5, name


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_split_mixer_matches_reference_mixer(packed: bool) -> None:
    """The whole mixer on the split path (conv, Triton scan, Triton gated norm) against the
    reference path with the same state dict: the parameters carry over between paths."""
    torch.manual_seed(2)
    ref = MambaMixer(16, headdim=8, d_state=16, ngroups=2, chunk_size=16, path="reference", device=DEVICE)
    with torch.no_grad():
        for prm in ref.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    split = MambaMixer(16, headdim=8, d_state=16, ngroups=2, chunk_size=16, path="split", device=DEVICE)
    split.load_state_dict(ref.state_dict())
    assert split.resolved_path == "split"
    u = torch.randn(2, 37, 16, device=DEVICE, requires_grad=True)
    seq_idx = torch.tensor(PACKED, device=DEVICE) if packed else None
    probe = torch.randn(2, 37, 16, device=DEVICE)

    y, y_ref = split(u, seq_idx), ref(u, seq_idx)
    assert _rel(y, y_ref) < 1e-5
    grads = torch.autograd.grad((y * probe).sum(), [u, *split.parameters()])
    ref_grads = torch.autograd.grad((y_ref * probe).sum(), [u, *ref.parameters()])
    names = ["input", *(name for name, _ in split.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert _rel(got, want) < 1e-5, name

"""Path selection for an op that is a Triton kernel beside its PyTorch reference (M2RNN's scan, the
experts' elementwise ops): "auto" is the kernel on CUDA where Triton imports, the reference
elsewhere; "triton" off CUDA runs only under the Triton interpreter (TRITON_INTERPRET=1, the CPU
tests) and otherwise says so."""

from __future__ import annotations

import os

import torch

from nam_mixers.ops.imports import import_error

PATHS = ("auto", "triton", "reference")


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or anywhere under the Triton interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_triton_path(op: str, path: str, device: torch.device) -> str:
    """The path of ``op`` ("triton" or "reference") that runs for tensors on ``device``."""
    if path not in PATHS:
        raise ValueError(f"{op} path must be one of {PATHS}, got {path!r}")
    if path == "auto":
        return "triton" if device.type == "cuda" and import_error("triton") is None else "reference"
    if path == "triton":
        if (err := import_error("triton")) is not None:
            raise RuntimeError(f"{op} path='triton' cannot import triton: {err}")
        if not triton_runs_on(device):
            raise RuntimeError(
                f"{op} path='triton' needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1; "
                "use path='reference' or 'auto' on CPU"
            )
    return path

"""Which Mamba execution paths can run here, and the errors that say why one cannot.

mamba-ssm and causal-conv1d are optional (README, "CUDA paths"); they are imported on first use,
never at package import, and a path that needs a missing one is an error, never a silent fallback.
"""

from __future__ import annotations

import torch

from nam_mixers.ops.imports import import_error
from nam_mixers.ops.triton_paths import triton_runs_on

PATHS = ("fused", "split", "reference")
CHOICES = ("auto", *PATHS)
_INSTALL = "see packages/nam-mixers/README.md, 'CUDA paths', or use path='reference'"


def _require(path: str, package: str, module: str, needed_for: str) -> None:
    reason = import_error(module)
    if reason is not None:
        raise RuntimeError(
            f"MambaMixer path={path!r} needs {package} ({needed_for}), which does not import here "
            f"({reason}); {_INSTALL}"
        )


def check_available(path: str) -> None:
    """Raise naming the missing package if `path` cannot run in this environment."""
    if path not in CHOICES:
        raise ValueError(f"MambaMixer: unknown path {path!r}; accepted: {', '.join(CHOICES)}")
    if path in ("fused", "split"):
        _require(path, "mamba-ssm", "mamba_ssm.ops.triton.ssd_combined", "its Triton SSD kernels")
    if path == "fused":
        _require(path, "causal-conv1d", "causal_conv1d", "its CUDA conv op, which the fused kernel calls")


def resolve_path(path: str, device: torch.device) -> str:
    """The path that runs for tensors on `device`: `path` itself if it can, the best one for 'auto'.

    'auto' prefers fused, then split, then reference, and considers the kernel paths only on CUDA.
    """
    check_available(path)
    if path == "auto":
        if device.type != "cuda":
            return "reference"
        for candidate in ("fused", "split"):
            try:
                check_available(candidate)
            except RuntimeError:
                continue
            return candidate
        return "reference"
    if path == "fused" and device.type != "cuda":
        raise RuntimeError(f"MambaMixer path='fused' runs on CUDA tensors only; got tensors on {device}")
    if path == "split" and not triton_runs_on(device):
        raise RuntimeError(
            f"MambaMixer path='split' runs its Triton kernels on CUDA tensors (or on CPU under "
            f"TRITON_INTERPRET=1); got tensors on {device}"
        )
    return path

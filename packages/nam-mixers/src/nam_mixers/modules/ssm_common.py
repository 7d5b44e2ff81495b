"""What the Mamba-2 and Mamba-3 cores share: argument checks, the dt bias initialisation, the
document index (seq_idx) their kernels take and the choice of kernel path."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch


def check_positive_ints(owner: str, **values: object) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def dt_bias_init(
    nheads: int, dt_min: float, dt_max: float, dt_floor: float, device: torch.device
) -> torch.Tensor:
    """mamba-ssm's dt initialisation: dt log-uniform in [dt_min, dt_max] (at least dt_floor); the
    bias is its softplus inverse (float64)."""
    u = torch.rand(nheads, device=device, dtype=torch.float64)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


def check_seq_idx(seq_idx: torch.Tensor, zxbcdt: torch.Tensor, ordered_check: bool) -> torch.Tensor:
    """seq_idx as the kernels want it (int32, contiguous). Whether it is non-decreasing is checked
    on the reference path only: on the kernel paths that check would cost a device sync per layer."""
    if seq_idx.shape != zxbcdt.shape[:2] or seq_idx.dtype.is_floating_point or seq_idx.is_complex():
        raise ValueError(
            f"MambaMixer: seq_idx must be an integer tensor [batch, seq] = {tuple(zxbcdt.shape[:2])}, "
            f"got {seq_idx.dtype} {tuple(seq_idx.shape)}"
        )
    if seq_idx.device != zxbcdt.device:
        raise ValueError(f"MambaMixer: seq_idx is on {seq_idx.device}, the input on {zxbcdt.device}")
    if ordered_check and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError(
            "MambaMixer: seq_idx must be non-decreasing along each row (one contiguous run of "
            "tokens per document)"
        )
    return seq_idx.to(torch.int32).contiguous()


class KernelPath:
    """``path`` (the requested one, checked when set) and ``resolved_path`` (the one a forward runs
    on this module's device, 'auto' resolved) of a core, by its ops package's two functions, which
    the core names as static methods."""

    _check_available: ClassVar[Callable[[str], None]]
    _resolve_path: ClassVar[Callable[[str, torch.device], str]]
    _path: str
    dt_bias: torch.Tensor

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        self._check_available(value)  # an unknown or unavailable path fails here, naming what is missing
        self._path = value

    @property
    def resolved_path(self) -> str:
        return self._resolve_path(self._path, self.dt_bias.device)


class CorePath:
    """A mixer's ``path`` and ``resolved_path``: those of its core."""

    core: KernelPath

    @property
    def path(self) -> str:
        return self.core.path

    @path.setter
    def path(self, value: str) -> None:
        self.core.path = value

    @property
    def resolved_path(self) -> str:
        return self.core.resolved_path

"""SIGTERM / SIGINT as a request to stop after the current step (with a checkpoint), not a kill.

Schedulers (Slurm, Kubernetes, torchrun) send SIGTERM before they kill; Ctrl-C sends SIGINT. The
handler only records the request. The loop asks ``requested()`` after each step; the answer is
all-reduced so that every rank stops after the same step even if only some got the signal.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import torch
import torch.distributed as torch_dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.name is None:
            self.name = signal.Signals(signum).name
            print(
                f"nam-train: {self.name} received: stopping after this step with a checkpoint",
                file=sys.stderr,
                flush=True,
            )

    def requested(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it after each step)."""
        flag = torch.tensor([1.0 if self.name else 0.0], device=self.device)
        if torch_dist.is_initialized():
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return bool(flag.item())

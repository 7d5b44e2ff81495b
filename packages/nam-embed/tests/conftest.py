from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session")
def megatron_single_rank() -> Iterator[None]:
    """A world of one (gloo, nam-runtime's CPU patches) with megatron's parallel state at
    TP = PP = DP = 1, for in-process tests."""
    from nam_runtime import dist

    dist.initialize()
    yield
    dist.teardown()


class _AllocatesInBackward(torch.autograd.Function):
    """Allocates on megatron's device in backward, as its sequence-parallel all-gather does."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad + torch.zeros(grad.shape, device=torch.cuda.current_device())


def require_cpu_runtime(capability: str) -> None:
    """Skip, saying why, when nam-runtime's CPU patches do not yet cover what a test needs
    (probed, not assumed: the test runs as soon as the runtime covers it)."""
    if torch.cuda.is_available():
        return
    from nam_runtime import cpu

    cpu.enable()
    probes = {
        # megatron's sequence-parallel all-gather allocates on its device inside backward
        "backward device arguments": (
            "CpuDeviceMode does not map device arguments inside autograd backward",
            lambda: _AllocatesInBackward.apply(torch.ones(2, requires_grad=True)).sum().backward(),
        ),
    }
    gap, probe = probes[capability]
    try:
        probe()
    except RuntimeError:
        pytest.skip(f"waits on nam-runtime: {gap}")

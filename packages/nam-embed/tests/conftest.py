from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def megatron_single_rank() -> Iterator[None]:
    """A world of one (gloo, nam-runtime's CPU patches) with megatron's parallel state at
    TP = PP = DP = 1, for in-process tests."""
    from nam_runtime import dist

    dist.initialize()
    yield
    dist.teardown()

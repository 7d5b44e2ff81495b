"""megatron-core on CPU through nam-runtime: one gloo rank in the test process for single-rank tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def megatron_single_rank() -> Iterator[None]:
    from nam_runtime import dist

    dist.initialize(seed=1234)
    yield
    dist.teardown()


@pytest.fixture(autouse=True)
def fresh_moe_state() -> None:
    """megatron keeps MoE logging state per process, sized by the first model that records into it:
    each test starts without what an earlier test's model left (else the tests pass or fail by order)."""
    from nam_runtime.megatron import reset_moe_state

    reset_moe_state()

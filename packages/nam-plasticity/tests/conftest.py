"""A one-rank world (gloo, megatron's parallel state, nam-runtime's CPU patches) for tests that
build real megatron modules in the test process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def megatron_tp1() -> Iterator[None]:
    from nam_runtime import dist

    dist.initialize(tensor_parallel=1)
    yield
    dist.teardown()

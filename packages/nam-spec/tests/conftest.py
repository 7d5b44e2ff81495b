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

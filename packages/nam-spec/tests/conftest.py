"""megatron-core on CPU through nam-runtime: one gloo rank in the test process for single-rank tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# megatron-core wraps a few helpers (the router's expert-bias update, bias-dropout-add) in
# torch.compile; on CPU each process would spend ~20 s compiling C++ for them. Eager runs the same
# math. Set before any torch.compile call; spawned ranks inherit it.
os.environ["TORCHDYNAMO_DISABLE"] = "1"


@pytest.fixture(scope="session")
def megatron_single_rank() -> Iterator[None]:
    from nam_runtime import dist

    dist.initialize(seed=1234)
    yield
    dist.teardown()

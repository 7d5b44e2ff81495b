"""A world of one GPU for benchmarks that build megatron-core modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def one_rank_world(seed: int = 1234) -> Iterator[Any]:
    """megatron's parallel state and RNG tracker for one rank (yields its nam_runtime World), torn
    down afterwards so that the next benchmark in the same process can set up its own."""
    from nam_runtime import dist

    world = dist.initialize(seed=seed)
    try:
        yield world
    finally:
        dist.teardown()

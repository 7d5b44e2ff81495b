"""Edits under megatron-core's bf16 optimizers at lr=0: Float16OptimizerWithFloat16Params (one
rank) and the DistributedOptimizer (two data-parallel gloo ranks, each owning half the masters).
Runs megatron's DDP wrapper and optimizers on CPU through nam-runtime."""

from __future__ import annotations

import pytest

testing = pytest.importorskip("nam_runtime.testing", reason="nam-runtime is not merged into this branch yet")


def _rank(distributed: bool) -> None:
    from megatron_training import check_edit_lands_in_masters

    from nam_runtime import dist

    dist.initialize(tensor_parallel=1)
    check_edit_lands_in_masters(distributed=distributed)


def test_float16_optimizer_keeps_the_edit_and_nothing_else_moves() -> None:
    testing.run_ranks(_rank, 1, False)


def test_distributed_optimizer_keeps_the_edit_on_every_shard() -> None:
    testing.run_ranks(_rank, 2, True)

"""Edits under megatron-core's bf16 optimizers at lr=0: Float16OptimizerWithFloat16Params (one
rank) and the DistributedOptimizer (two data-parallel gloo ranks, each owning part of the
masters). DASH there reads the reduced main_grad (per-row partial sums under the distributed
optimizer). megatron's DDP wrapper and optimizers run on CPU through nam-runtime."""

from __future__ import annotations

from nam_runtime.testing import run_ranks


def _rank(distributed: bool) -> None:
    from megatron_training import check_dash_reads_reduced_main_grad, check_edit_lands_in_masters

    from nam_runtime import dist

    dist.initialize(tensor_parallel=1)
    check_edit_lands_in_masters(distributed=distributed)
    check_dash_reads_reduced_main_grad(distributed=distributed)


def test_float16_optimizer_keeps_the_edit_and_nothing_else_moves() -> None:
    run_ranks(_rank, 1, False, timeout_s=300)


def test_distributed_optimizer_keeps_the_edit_on_every_shard() -> None:
    run_ranks(_rank, 2, True, timeout_s=300)

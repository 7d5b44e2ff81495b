"""Edits under megatron-core's bf16 optimizers: Float16OptimizerWithFloat16Params (one process)
and the DistributedOptimizer (two data-parallel gloo ranks). Needs nam-runtime's CPU patches."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

cpu = pytest.importorskip(
    "nam_runtime.cpu", reason="nam-runtime's CPU patches are not merged into this branch yet"
)


def test_float16_optimizer_keeps_the_edit_and_nothing_else_moves(megatron_tp1: None) -> None:
    from megatron_training import check_edit_lands_in_masters

    check_edit_lands_in_masters(distributed=False)


def _dp_rank(rank: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    from megatron_training import check_edit_lands_in_masters

    check_edit_lands_in_masters(distributed=True)
    dist.destroy_process_group()


def test_distributed_optimizer_keeps_the_edit_on_every_shard() -> None:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dp_rank, args=(f"{d}/store",), nprocs=2, join=True)

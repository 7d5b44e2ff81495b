from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single_rank() -> Iterator[None]:
    """One gloo rank with megatron's parallel state at TP = PP = DP = 1, for in-process tests."""
    from megatron.core import parallel_state

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _rank_main(rank: int, world_size: int, init_file: str, fn: Callable[..., None], args: tuple) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=90),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(fn: Callable[..., None], world_size: int, tmp_path: Path, *args: object) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; a failing
    rank fails the test with its traceback. (Stands in for nam_runtime.testing until it lands.)"""
    mp.spawn(_rank_main, args=(world_size, str(tmp_path / "rendezvous"), fn, args), nprocs=world_size)

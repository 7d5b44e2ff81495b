"""Shared fixtures: megatron-core on CPU in this process (one gloo rank) and in spawned ranks.

nam_runtime.cpu (issue 3) is the package that makes megatron-core run without CUDA; until it
lands, ``cpu_megatron`` applies the three narrow stand-ins nam-spec's tests reach (listed in
_cpu_standin.py), only when CUDA is absent. Replace it with nam_runtime.cpu and
nam_runtime.testing when those exist.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _cpu_standin import cpu_megatron

# megatron-core wraps a few helpers (the router's expert-bias update, bias-dropout-add) in
# torch.compile; on CPU each process would spend ~20 s compiling C++ for them. Eager runs the same
# math. Set before any torch.compile call, inherited by the spawned ranks.
os.environ["TORCHDYNAMO_DISABLE"] = "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single_rank() -> Iterator[None]:
    """One gloo rank with megatron's parallel state at TP = PP = 1, in the test process."""
    from megatron.core import parallel_state

    cpu_megatron()
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    parallel_state.initialize_model_parallel(1, 1, expert_tensor_parallel_size=1)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _rank_main(
    rank: int, world_size: int, init_file: str, tp: int, pp: int, fn: Callable[..., None], args: tuple
) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(1)
    cpu_megatron()
    from megatron.core import parallel_state

    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=90),
    )
    parallel_state.initialize_model_parallel(tp, pp, expert_tensor_parallel_size=1)
    try:
        fn(rank, *args)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def run_ranks(
    fn: Callable[..., None], world_size: int, tmp_path: Path, *args: object, tp: int = 1, pp: int = 1
) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` spawned gloo processes with megatron's parallel
    state at (tp, pp); a failing rank fails the test with its traceback."""
    init = tmp_path / f"rendezvous-{tp}-{pp}-{world_size}"
    mp.spawn(_rank_main, args=(world_size, str(init), tp, pp, fn, args), nprocs=world_size)

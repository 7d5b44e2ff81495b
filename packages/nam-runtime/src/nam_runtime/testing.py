"""Run a function in N spawned processes, one per rank, for multi-process tests.

    from nam_runtime.testing import run_ranks

    def _step(tp: int) -> float:          # module level: spawned ranks import it by name
        world = nam_runtime.dist.initialize(tensor_parallel=tp)
        ...
        return loss

    def test_tp2() -> None:
        losses = run_ranks(_step, 2, tp=2)  # one result per rank, in rank order

Each rank gets its own free rendezvous port, OMP_NUM_THREADS=1, RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR/MASTER_PORT, and `nam_runtime.dist.teardown()` after the function returns. A rank that
raises fails the call with its traceback; a run past `timeout_s` (a collective hang) kills every
rank and fails naming the ranks that had not finished. The CPU patches' hit counts of every rank
are added to the calling process's `nam_runtime.cpu` table, and each rank checks that CUDA was
never initialised.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["RankFailure", "free_port", "run_ranks"]

_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(AssertionError):
    """A rank raised, died or did not finish in time. An AssertionError so pytest shows it as a
    test failure with the rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], rank: int, results: Any
) -> None:
    # Imported here, inside the rank: the parent may not have torch loaded.
    import torch

    from nam_runtime import cpu, dist

    torch.set_num_threads(1)
    try:
        value = fn(*args, **kwargs)
        if torch.cuda.is_initialized() and not torch.cuda.is_available():
            raise RuntimeError("CUDA was initialised in a process without CUDA")
        results.put((rank, "ok", value, cpu.hits()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc(), cpu.hits()))
    finally:
        if dist.is_initialized():
            dist.teardown()


def run_ranks[T](
    fn: Callable[..., T], world_size: int, *args: Any, timeout_s: float = 90.0, **kwargs: Any
) -> list[T]:
    """Run `fn(*args, **kwargs)` in `world_size` spawned processes; return their results in
    rank order. `fn`, its arguments and its result must pickle (define `fn` at module level)."""
    __tracebackhide__ = True  # pytest shows the rank's traceback, not this loop
    from nam_runtime import cpu

    if world_size < 1:
        raise ValueError(f"world_size={world_size}: need at least one rank")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    rank_env = {
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    saved = {key: os.environ.get(key) for key in (*_RANK_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    procs = []
    try:
        # A spawned child copies os.environ when it starts: set each rank's variables around start().
        os.environ.update(rank_env)
        for rank in range(world_size):
            os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
            proc = ctx.Process(target=_rank_main, args=(fn, args, kwargs, rank, results), name=f"rank{rank}")
            proc.start()
            procs.append(proc)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise RankFailure(
                    f"{fn.__qualname__}: ranks {missing} of {world_size} did not finish within {timeout_s:.0f} s "
                    f"(a collective hang or a slow rank){_errors(outcomes)}"
                )
            try:
                rank, status, value, counts = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                dead = [p for p in dead if int(p.name.removeprefix("rank")) not in outcomes]
                if dead:
                    codes = ", ".join(f"{p.name} exit code {p.exitcode}" for p in dead)
                    raise RankFailure(
                        f"{fn.__qualname__}: {codes} before reporting{_errors(outcomes)}"
                    ) from None
                continue
            outcomes[rank] = (status, value)
            cpu.merge_hits(counts)
            if status == "error":
                # One rank failed: the others may now wait forever on a collective.
                raise RankFailure(f"{fn.__qualname__}: rank {rank} of {world_size} raised:\n{value}")
    finally:
        for proc in procs:
            proc.join(timeout=5.0 if len(outcomes) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
    return [outcomes[rank][1] for rank in range(world_size)]


def _errors(outcomes: dict[int, tuple[str, Any]]) -> str:
    failed = [
        f"\nrank {rank} raised:\n{value}"
        for rank, (status, value) in sorted(outcomes.items())
        if status == "error"
    ]
    return "".join(failed)

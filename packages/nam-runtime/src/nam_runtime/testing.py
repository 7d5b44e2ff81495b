"""Run a function in N fresh processes, one per rank, for multi-process tests.

    from nam_runtime.testing import run_ranks

    def _step(tp: int) -> float:          # module level: ranks import it by name
        world = nam_runtime.dist.initialize(tensor_parallel=tp)
        ...
        return loss

    def test_tp2() -> None:
        losses = run_ranks(_step, 2, tp=2)  # one result per rank, in rank order

Ranks are forked from a multiprocessing forkserver that imported torch and megatron-core once and
did nothing else, so a rank starts in a fraction of a second instead of re-importing them (~10 s
of CPU per rank). Each rank gets its own free rendezvous port, OMP_NUM_THREADS=1, RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR/MASTER_PORT, and `nam_runtime.dist.teardown()` after the function returns. A rank that
raises fails the call with its traceback; a run past `timeout_s` (a collective hang) kills every
rank and fails naming the ranks that had not finished. The CPU patches' hit counts of every rank
are added to the calling process's `nam_runtime.cpu` table, and each rank checks that CUDA was
never initialised.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from nam_runtime.environ import environ

__all__ = ["RankFailure", "free_port", "run_ranks"]

# Imported once by the forkserver; every rank forks from it with these already loaded. A module
# that does not import (megatron-core absent) is skipped by multiprocessing.
_PRELOAD = [
    "torch",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "nam_runtime.dist",
]
_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_CONTEXT: Any = None


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(_PRELOAD)
    return _CONTEXT


class RankFailure(AssertionError):
    """A rank raised, died or did not finish in time. An AssertionError so pytest shows it as a
    test failure with the rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    env: dict[str, str],
    rank: int,
    results: Any,
) -> None:
    # A forked rank starts with the forkserver's environment: it takes the caller's, as spawn would.
    os.environ.clear()
    os.environ.update(env)
    try:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)
        value = fn(*args, **kwargs)
        torch = sys.modules.get("torch")
        if torch is not None and not torch.cuda.is_available() and torch.cuda.is_initialized():
            raise RuntimeError("CUDA was initialised in a process without CUDA")
        # by value: on a multiprocessing queue torch shares a tensor's storage through a file
        # descriptor that this process serves, and it may have exited before the caller reads it
        results.put((rank, "ok", pickle.dumps(value), _hits()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc(), _hits()))
    finally:
        dist = sys.modules.get("nam_runtime.dist")
        if dist is not None and dist.is_initialized():
            dist.teardown()


def _hits() -> dict[str, int]:
    cpu = sys.modules.get("nam_runtime.cpu")
    return cpu.hits() if cpu is not None else {}


def run_ranks[T](
    fn: Callable[..., T], world_size: int, *args: Any, timeout_s: float = 90.0, **kwargs: Any
) -> list[T]:
    """Run `fn(*args, **kwargs)` in `world_size` fresh processes; return their results in
    rank order. `fn`, its arguments and its result must pickle (define `fn` at module level)."""
    __tracebackhide__ = True  # pytest shows the rank's traceback, not this loop
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: need at least one rank")
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = []
    # the forkserver starts on first use with this environment: one thread per rank from the start
    with environ(_THREADS):
        for rank in range(world_size):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            proc = ctx.Process(
                target=_rank_main, args=(fn, args, kwargs, env, rank, results), name=f"rank{rank}"
            )
            proc.start()
            procs.append(proc)

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
            outcomes[rank] = (status, pickle.loads(value) if status == "ok" else value)
            if counts:
                from nam_runtime import cpu  # only when a rank used it: the caller may not have torch

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

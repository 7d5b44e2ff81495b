"""A world of one GPU for benchmarks that build megatron-core modules, in this process or in a fresh one."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from bench.report import Report


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


def in_fresh_process(report: Report, case: Callable[..., Any], *args: Any) -> Any:
    """``case(report, world, *args)`` in a spawned process on its own one-rank world; its checks,
    rows and failure join ``report``; returns what it returned (picklable), None if it failed.

    A model trained under megatron's DDP is never freed in its process: DDP's gradient hooks live
    on autograd nodes that hold the DDP module, a cycle through C++ that the collector cannot see.
    A second model built beside it lacked the ~20 GiB the first still held (and would start from
    another random state), so each model that is timed gets a process of its own."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(report.commit, report.bench, case, args, queue))
    child.start()
    while True:
        try:
            checks, rows, failures, result = queue.get(timeout=5)
            break
        except Empty:
            if not child.is_alive():  # killed (out of host memory, a signal) before it could report
                raise RuntimeError(
                    f"{case.__name__}{args}: its process exited with {child.exitcode}"
                ) from None
    child.join()
    report.checks += checks
    report.rows += rows
    for bench, tb in failures.items():
        report.fail(bench, tb)
    return result


def _child(commit: str, bench: str, case: Callable[..., Any], args: tuple, queue: Any) -> None:
    report = Report(commit=commit)
    report.begin(bench)
    result = None
    try:
        with one_rank_world() as world:
            result = case(report, world, *args)
    except Exception:
        report.fail(bench, f"{case.__name__}{args}:\n{traceback.format_exc()}")
    queue.put((report.checks, report.rows, report.failures, result))

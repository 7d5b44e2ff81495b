"""The preparation's worker processes: an ordered ``imap`` over a spawn-started pool, or the plain
``map`` of this process for one worker (no process to start, the tests' and small corpora's case).

Spawn, not fork: the caller has torch (and its threads) loaded, which a forked child must not
inherit. Each worker keeps to one thread (tokenizers' and torch's pools would oversubscribe the
cores the workers already share out) and silences the library notices nam_runtime.quiet lists, as
nam-train's own process does: a spawned child starts without its filters and would print torch's
and megatron's import-time notices once per worker. Results come back in task order whatever
finishes first.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import Pool
from types import TracebackType
from typing import Any

from nam_runtime.quiet import quiet


class Workers:
    def __init__(self, count: int) -> None:
        self.count = count
        self._pool: Pool | None = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is not None:
            if kind is None:
                self._pool.close()
            else:
                self._pool.terminate()  # Ctrl-C or an error: drop the work in flight (units are atomic)
            self._pool.join()

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """``fn`` over ``items``, results in order; the pool starts on the first call that needs it."""
        if self.count == 1:
            return map(fn, items)
        if self._pool is None:
            _check_importable_main(self.count)
            self._pool = multiprocessing.get_context("spawn").Pool(self.count, initializer=_start_worker)
        return self._pool.imap(fn, items, chunksize=1)


def _check_importable_main(count: int) -> None:
    """A spawned child first runs the parent's main script again; one read from stdin (``python -``)
    has no file, so every child would die at start and the pool restart them forever."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is None and path is not None and not os.path.isfile(path):
        raise RuntimeError(
            f"data.workers = {count}: worker processes import the main script again, and {path!r} is "
            "no file (a script piped to python -); run it from a file, or set data.workers = 1"
        )


def _start_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["OMP_NUM_THREADS"] = "1"
    quiet()  # before build_unit imports megatron, which speaks at import
    import torch

    torch.set_num_threads(1)

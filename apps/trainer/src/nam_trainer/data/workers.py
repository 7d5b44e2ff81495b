"""The preparation's worker processes: an ordered ``imap`` over a spawn-started pool, or the plain
``map`` of this process for one worker (no process to start, the tests' and small corpora's case).

Spawn, not fork: the caller has torch (and its threads) loaded, which a forked child must not
inherit. A worker imports neither torch nor megatron (numpy, tokenizers and tree-sitter only):
their imports cost a spawned process seconds before its first unit, so the modules a worker
loads (the tasks' and the main script's, which a spawned child imports again) keep them out of
their top level. Each worker keeps to one thread (tokenizers' and numpy's pools would
oversubscribe the cores the workers already share out). Results come back in task order whatever
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

from nam_runtime.environ import environ

# In a worker's environment from its start: the libraries read them when they load.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


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
            self._pool = _spawn_pool(self.count)
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


def _spawn_pool(count: int) -> Pool:
    """The pool, its workers started with WORKER_ENV; this process's environment is left as it was
    (a worker the pool restarts after one died misses them: it is only slower)."""
    with environ(WORKER_ENV):
        return multiprocessing.get_context("spawn").Pool(count)

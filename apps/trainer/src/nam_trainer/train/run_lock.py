"""One writer per run directory: ``RUN_DIR/nam-train.lock`` names the job that holds it.

Two runs on one directory would interleave metrics.jsonl and race on the checkpoints, so the
second is refused. Rank 0 takes the lock for the whole job (every rank writes checkpoint shards,
but none before rank 0 has passed the lock: the loop shares its outcome through a collective).

The file holds the holder's host, pid and start time; an exclusive ``flock`` on it lasts as long
as the holder's process, so the kernel frees it when that process dies, however it dies. A lock
file whose flock is free is stale: taken over with a notice when its holder ran on this host
(where a free flock means the process is gone), refused when it names another host (a network
file system may not carry flocks between hosts, so that job may still run).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOCK_FILE = "nam-train.lock"


class RunDirBusy(Exception):
    """Another job holds the run directory; the message names it."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, say: Callable[[str], None]) -> None:
        """Hold the lock or raise RunDirBusy; ``say`` gets the notice of a stale lock taken over."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunDirBusy(self._busy(holder, "is running")) from None
            # The holder before us may have removed the file between our open and our flock: then
            # we hold a lock on a name that no longer exists, and must start again.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        holder = _read(fd)
        if holder:
            if holder.get("host") != socket.gethostname():
                os.close(fd)
                raise RunDirBusy(
                    self._busy(holder, "may still be running")
                    + "; if that job has ended, delete the lock file and start again"
                )
            say(
                f"nam-train: taking over the stale lock {self.path} of {_who(holder)} "
                "(that process is gone; it did not release the lock)"
            )
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file, then drop the flock (in that order, so no one takes a file that
        is about to vanish; ``acquire`` checks for that case)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def _busy(self, holder: dict[str, Any], state: str) -> str:
        return (
            f"run directory {self.path.parent} is in use: {_who(holder)} {state} there (lock file "
            f"{self.path}); wait for it, stop it, or pass another --checkpoint.dir"
        )


def _read(fd: int) -> dict[str, Any]:
    """The holder the lock file names ({} when it is empty or not ours to parse)."""
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"unreadable": text[:80]} if text.strip() else {}
    return holder if isinstance(holder, dict) else {"unreadable": text[:80]}


def _who(holder: dict[str, Any]) -> str:
    if "unreadable" in holder:
        return f"an unknown holder ({holder['unreadable']!r})"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)

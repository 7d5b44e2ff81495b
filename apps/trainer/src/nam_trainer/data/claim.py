"""Who builds a cache entry when several processes, on one host or several, want it at once.

The builder is the process whose exclusive create (``O_CREAT | O_EXCL``, atomic on local and
network file systems) of the entry's claim file succeeds; the file names it (host, pid, start)
and the builder touches it every ``HEARTBEAT_S`` seconds from a thread. The others poll for the
claim to go. A claim is stale, and is removed so that a waiter can take over, when its holder
is a process of this host that is gone, or when its modification time has not moved for
``STALE_S`` seconds of the waiter's own clock (a builder on another host that died: no clock
comparison across hosts is needed).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEARTBEAT_S = 10.0
STALE_S = 120.0  # a dozen missed heartbeats: a builder that is alive never gets there
POLL_S = 0.25
SAY_EVERY_S = 60.0


class BuildClaim:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"claim {path.name}", daemon=True)

    @classmethod
    def take(cls, path: Path) -> BuildClaim | None:
        """The claim on ``path``, or None when another process holds it."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, f)
        claim = cls(path)
        claim._beat.start()
        return claim

    def release(self) -> None:
        self._stop.set()
        self._beat.join()
        self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # removed as stale after all: the next waiter builds too, harmlessly
                return


def wait_for_build(entry: Path, claim: Path, log: Callable[[str], None]) -> None:
    """Return once ``claim`` is gone (released, or removed here as stale)."""
    last_mtime, moved_at, said = None, time.monotonic(), time.monotonic()
    while True:
        try:
            mtime = claim.stat().st_mtime_ns
            holder = _holder(claim)
        except FileNotFoundError:
            return
        now = time.monotonic()
        if mtime != last_mtime:
            last_mtime, moved_at = mtime, now
        gone = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
        if gone or now - moved_at > STALE_S:
            why = "is gone" if gone else f"has not shown a heartbeat for {STALE_S:.0f} s"
            log(f"cache: taking over the build of {entry}: its builder {_who(holder)} {why}")
            _remove(claim)
            return
        if now - said > SAY_EVERY_S:
            log(f"cache: waiting for {_who(holder)} to build {entry}")
            said = now
        time.sleep(POLL_S)


def _holder(claim: Path) -> dict[str, Any]:
    try:
        found = json.loads(claim.read_text())
    except json.JSONDecodeError:  # read between the create and the write: the holder is writing it
        return {}
    return found if isinstance(found, dict) else {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True  # not yet written: assume a live holder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _who(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _remove(claim: Path) -> None:
    """Remove a stale claim; of several waiters that saw it stale only one renames it away."""
    aside = claim.with_name(f"{claim.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(claim, aside)
    except FileNotFoundError:
        return
    aside.unlink(missing_ok=True)

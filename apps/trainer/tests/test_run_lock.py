"""One writer per run directory: the lock names its holder, refuses a second, takes over a stale one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nam_trainer.train.run_lock import LOCK_FILE, RunDirBusy, RunLock


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_the_holder_is_named_and_a_second_writer_refused(tmp_path: Path) -> None:
    first, notices = RunLock(tmp_path), []
    first.acquire(notices.append)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["started"]
    with pytest.raises(RunDirBusy, match=f"is in use: pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock(tmp_path).acquire(
            notices.append
        )  # a flock of its own open file: refused like another process
    first.release()
    assert not (tmp_path / LOCK_FILE).exists() and notices == []
    again = RunLock(tmp_path)
    again.acquire(notices.append)  # released: free for the next run, with no notice
    again.release()
    assert notices == []


def test_a_stale_lock_of_a_dead_process_here_is_taken_over_with_a_notice(tmp_path: Path) -> None:
    pid = _dead_pid()
    stale = {"host": socket.gethostname(), "pid": pid, "started": "2025-01-01 00:00:00 +0000"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    lock, notices = RunLock(tmp_path), []
    lock.acquire(notices.append)
    assert (
        len(notices) == 1 and f"taking over the stale lock {tmp_path / LOCK_FILE} of pid {pid}" in notices[0]
    )
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_of_another_host_is_refused(tmp_path: Path) -> None:
    """A network file system may not carry the flock across hosts: that job may still be running."""
    other = {"host": "node-17", "pid": 4242, "started": "2025-01-01 00:00:00 +0000"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(
        RunDirBusy, match=r"pid 4242 on host node-17 .* may still be running .* delete the lock file"
    ):
        RunLock(tmp_path).acquire(print)
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == other  # left as it was

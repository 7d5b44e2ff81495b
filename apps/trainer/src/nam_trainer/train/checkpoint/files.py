"""The checkpoint layout on disk: step directories, the completion marker's name, `latest`, atomic
writes, leftovers of killed writes and pruning. Only rank 0 writes here."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

MARKER = "nam_checkpoint.json"  # metadata, written last: its presence means complete
LATEST = "latest"
CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"  # a write in progress or killed
OLD_PREFIX = ".old-"  # a checkpoint of the same step being replaced
DAMAGED_PREFIX = (
    "damaged-"  # a checkpoint a resume found damaged: kept for inspection, never loaded or pruned
)
_STEP_DIR = re.compile(r"step_(\d{7,})")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it is complete, else the complete
    checkpoint of the highest step; None when there is none. Temporary and incomplete directories
    (no completion marker) are never returned."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.parent == root and _STEP_DIR.fullmatch(named.name) and (named / MARKER).is_file():
            return named
    complete = complete_checkpoints(root)
    return complete[-1][1] if complete else None


def resume_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints a resume tries, in order: find_latest's, then the other complete ones, newest
    step first."""
    first = find_latest(run_dir)
    if first is None:
        return []
    older = [path for _, path in reversed(complete_checkpoints(Path(run_dir) / CHECKPOINTS)) if path != first]
    return [first, *older]


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `damaged-step_N` (`-2`, `-3`, ... if taken): kept, but out of
    find_latest's and pruning's sight, so that the checkpoints kept by keep_last are good ones."""
    target = path.with_name(f"{DAMAGED_PREFIX}{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}")
    path.rename(target)
    fsync_dir(path.parent)
    return target


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """`text` in `path`, all or nothing: a temporary file, fsynced, renamed over it. The temporary
    name is a leftover's (TMP_PREFIX) should a kill stop it halfway."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_leftovers(root: Path) -> None:
    """Temporary directories of killed writes and replaced checkpoints: never complete, never loaded."""
    for entry in root.iterdir():
        if entry.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def prune(root: Path, keep_last: int, written: Path) -> None:
    """Keep the newest `keep_last` complete checkpoints by step, and always the one just written."""
    complete = complete_checkpoints(root)
    for _, path in complete[: max(0, len(complete) - keep_last)]:
        if path != written:
            # renamed first (atomic): a kill mid-removal leaves a leftover the next save removes, not
            # an incomplete step directory that nothing would ever remove
            old = root / f"{OLD_PREFIX}{path.name}"
            path.rename(old)
            shutil.rmtree(old)


def publish(root: Path, tmp: Path, final: Path, marker_text: str, keep_last: int) -> None:
    """Rank 0, once every rank's shards are in `tmp`: the marker last inside it, `tmp` renamed to
    `final` (a checkpoint of the same step moved aside first), `latest` pointed at it, leftovers
    removed and old checkpoints pruned."""
    write_atomic(tmp / MARKER, marker_text)
    if final.exists():  # the same step again (e.g. a final save right after an interval save)
        final.rename(root / f"{OLD_PREFIX}{final.name}")
    tmp.rename(final)
    fsync_dir(root)
    write_atomic(root / LATEST, final.name + "\n")
    remove_leftovers(root)
    prune(root, keep_last, final)

"""Content-keyed cache entries that are either complete and verified, or absent.

An entry is a directory ``ROOT/KIND/KEY`` where KEY is a hash of everything that determines its
content (``key_inputs``). It is built under a temporary name in the same directory and renamed
into place only after its manifest, written last, records every file's size and sha256. Loading
re-checks the manifest (format, key inputs) and every file against it: an entry that fails any
check is reported and rebuilt, never used. A crash mid-build leaves only a temporary directory,
which is never read. Who builds is decided by an atomic claim file (``claim.py``), which works across
hosts on a shared file system; correctness never depends on it (two builders of one entry write
the same content and the rename keeps either), it only spares the work twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nam_trainer.data.claim import BuildClaim, wait_for_build

MANIFEST = "manifest.json"
FORMAT = 2  # bump when the layout of any entry changes: older entries then read as stale


def cache_key(key_inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key_inputs, sort_keys=True).encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(entry: Path) -> dict[str, Any]:
    return json.loads((entry / MANIFEST).read_text())


def problem(entry: Path, key_inputs: dict[str, Any]) -> str | None:
    """Why ``entry`` cannot be used for ``key_inputs``, or None when it is complete and intact."""
    try:
        manifest = read_manifest(entry)
    except FileNotFoundError:
        return "it has no manifest"
    except (OSError, json.JSONDecodeError) as err:
        return f"its manifest is unreadable ({err})"
    if manifest.get("format") != FORMAT:
        return f"it has cache format {manifest.get('format')!r}, this version writes {FORMAT} (stale)"
    if manifest.get("key_inputs") != key_inputs:
        return "it was built from different inputs (stale)"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    for name, meta in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']} (corrupt)"
        if file_sha256(path) != meta["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupt)"
    return None


def load_or_build(
    root: Path,
    kind: str,
    key_inputs: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    log: Callable[[str], None] = print,
) -> Path:
    """The verified entry for ``key_inputs``, built by ``build(tmp_dir) -> info`` when absent or bad.

    ``build`` writes its files into the directory it is given and returns facts to keep in the
    manifest under ``info``. Of the processes that call it at once (torchrun ranks, on one host or
    several), the one that takes the entry's build claim builds; the others wait for it.
    """
    entry = root / kind / cache_key(key_inputs)
    entry.parent.mkdir(parents=True, exist_ok=True)
    claim_path = entry.parent / f".{entry.name}.claim"
    while True:
        why = problem(entry, key_inputs) if entry.exists() else None
        if entry.exists() and why is None:
            log(f"cache: using {entry}")
            return entry
        claim = BuildClaim.take(claim_path)
        if claim is None:
            wait_for_build(entry, claim_path, log)
            continue
        try:
            if problem(entry, key_inputs) is None:  # finished by the previous claimant meanwhile
                continue
            log(f"cache: rebuilding {entry}: {why}" if why else f"cache: building {entry}")
            _build(entry, key_inputs, build)
            return entry
        finally:
            claim.release()


def _build(entry: Path, key_inputs: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> None:
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        info = build(tmp)
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {"format": FORMAT, "key_inputs": key_inputs, "files": files, "info": info}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        _publish(tmp, entry, key_inputs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, entry: Path, key_inputs: dict[str, Any]) -> None:
    """Rename ``tmp`` to ``entry``; a bad entry there is moved aside first. If another process
    published a good entry meanwhile, keep theirs."""
    for path in tmp.iterdir():  # the data reaches the disk before the name does
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if entry.exists():
        if problem(entry, key_inputs) is None:
            return
        trash = entry.parent / f".trash-{entry.name}-{uuid.uuid4().hex[:8]}"
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError:
        # lost a race: another builder renamed its entry into place between our check and rename
        if problem(entry, key_inputs) is not None:
            raise

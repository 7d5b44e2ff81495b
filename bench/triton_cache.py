"""Triton's kernel cache as one archive that travels with the GPU machine's tree and back.

    python3 bench/triton_cache.py pack OUT_FILE     # /tmp/triton-cache -> OUT_FILE
    python3 bench/triton_cache.py unpack IN_FILE    # IN_FILE -> /tmp/triton-cache

xz at preset 3, with Python's tarfile (the machine need not have an xz binary): on 2026-12-07 the
cache's 124 MB packed to 8.8 MB in ~5 s, where gzip's 15.7 MB had grown past the 16 MiB a file
returned from the machine may have.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

CACHE = Path("/tmp/triton-cache")


def pack(archive: Path) -> None:
    with tarfile.open(archive, "w:xz", preset=3) as tar:
        tar.add(CACHE, arcname=CACHE.name)


def unpack(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE.parent, filter="data")


if __name__ == "__main__":
    verb, path = sys.argv[1:]
    {"pack": pack, "unpack": unpack}[verb](Path(path))

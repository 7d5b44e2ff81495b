"""The seam to nam-embed's C++ structure extractor: channels per token as a small integer array.

This is the only module of the trainer that knows the extractor; packing sees a [channels, tokens]
array. Values are stored as uint16: category and node type are far below that, and the unbounded
counts (dependency, depth, sibling) saturate at 65535, far above the buckets the embedding's
schema clamps them to.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence

import numpy as np

import nam_embed
from nam_embed.cpp import cpp_structure_rows
from nam_embed.cpp_vocab import CHANNELS, UNKNOWN_ID

DTYPE = np.uint16


def extractor_version() -> dict[str, str]:
    """What the channels depend on, for cache keys: the extractor and the grammar it parses with.
    nam-embed's own version comes from the module: run from source (the GPU bench) it has no
    installed metadata."""
    return {
        "channels": ",".join(CHANNELS),
        "nam-embed": nam_embed.__version__,
        "tree-sitter": importlib.metadata.version("tree-sitter"),
        "tree-sitter-cpp": importlib.metadata.version("tree-sitter-cpp"),
    }


def cpp_structure(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray | None:
    """[len(CHANNELS), len(offsets)] structure channels of C++ ``text`` for tokens at character spans
    ``offsets``, or None when the extractor fails on it (the caller marks the channels unknown)."""
    try:
        rows = cpp_structure_rows(text, offsets)  # not the torch tensors: the workers run without torch
    except (RecursionError, ValueError, RuntimeError, MemoryError):  # tree-sitter gave up on this text
        return None
    stacked = np.array(rows, dtype=np.int64).reshape(len(rows), len(CHANNELS)).T
    return np.minimum(stacked, np.iinfo(DTYPE).max).astype(DTYPE)


def unknown_structure(tokens: int) -> np.ndarray:
    """Channels of a text without structure: 0 everywhere, node type ``<unknown>``."""
    out = np.zeros((len(CHANNELS), tokens), dtype=DTYPE)
    out[CHANNELS.index("node_type")] = UNKNOWN_ID
    return out

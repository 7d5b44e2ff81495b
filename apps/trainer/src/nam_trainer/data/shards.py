"""Megatron indexed datasets (``<prefix>.bin/.idx``) written without megatron: the unit shards of
the preparation's workers and the packed rows of the cache. megatron's IndexedDataset reads them.

Not megatron's IndexedDatasetBuilder: importing it (megatron.core's __init__, and torch) costs a
worker process ~6 s, most of a unit's work; the bytes are the same (tests/test_units.py).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_DTYPE_CODES = {
    np.dtype(t): code
    for code, t in enumerate(
        (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16), start=1
    )
}


class ShardWriter:
    """``<prefix>.bin/.idx``: one megatron indexed dataset, byte for byte what megatron's
    IndexedDatasetBuilder writes with ``add_item`` per array and one ``end_document``: one sequence
    per array, all of them in a single megatron document; megatron's IndexedDataset reads it."""

    def __init__(self, prefix: Path, dtype: np.dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._code = _DTYPE_CODES[self.dtype]
        self._bin = open(f"{prefix}.bin", "wb")  # noqa: SIM115 (closed by finalize)
        self._lengths: list[int] = []

    def add(self, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=self.dtype)
        self._bin.write(data.tobytes())
        self._lengths.append(data.size)

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.array(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)  # byte offset of each sequence in the .bin
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.array([0, len(lengths)], dtype=np.int64)  # sequence index bounds of the documents
        with open(f"{self.prefix}.idx", "wb") as f:
            f.write(_INDEX_HEADER)
            f.write(struct.pack("<QBQQ", _INDEX_VERSION, self._code, len(lengths), len(documents)))
            for array in (lengths, pointers, documents):
                f.write(array.tobytes())

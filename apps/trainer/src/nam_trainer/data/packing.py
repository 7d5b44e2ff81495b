"""Packing tokenized documents into fixed-length rows, and writing them with megatron-core's
indexed dataset builder.

The documents of a split, each followed by the EOS token, are laid end to end into one stream
and cut into rows of ``seq_length + 1`` tokens with a stride of ``seq_length``: row r holds
stream positions [r L, r L + L], so consecutive rows share one token and every stream token
after the first is a label exactly once (inputs are row[:-1], labels row[1:]). The tail is
filled with the pad token. Beside the tokens, per position:

- ``document_ids``: index of the document in the split (the manifest lists the names), -1 on pad;
- ``position_ids``: position within its document (0 at each document start; EOS continues it);
- ``loss_mask``: 1 where the token is a real label, 0 on pad;
- ``structure``: the structure channels ([channels, L + 1] per row, 0 for EOS and pad).

Each field is one megatron ``IndexedDataset`` (``<split>.<field>.bin/.idx``) holding one
sequence per row, all rows in a single megatron document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nam_trainer.data.structure import DTYPE as STRUCTURE_DTYPE

FIELD_DTYPES: dict[str, type[np.number]] = {
    "document_ids": np.int32,
    "position_ids": np.int32,
    "loss_mask": np.uint8,
    "structure": STRUCTURE_DTYPE,
}


def token_dtype(vocab_size: int) -> type[np.number]:
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


@dataclass(frozen=True)
class PackedRows:
    tokens: np.ndarray  # [rows, L + 1]
    document_ids: np.ndarray  # [rows, L + 1] int32
    position_ids: np.ndarray  # [rows, L + 1] int32
    loss_mask: np.ndarray  # [rows, L + 1] uint8
    structure: np.ndarray | None  # [rows, channels, L + 1] uint16, or None without structure

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def fields(self) -> dict[str, np.ndarray]:
        out = {
            "tokens": self.tokens,
            "document_ids": self.document_ids,
            "position_ids": self.position_ids,
            "loss_mask": self.loss_mask,
        }
        if self.structure is not None:
            out["structure"] = self.structure
        return out


def pack(
    token_ids: Sequence[np.ndarray],
    seq_length: int,
    eos_id: int,
    pad_id: int,
    structure: Sequence[np.ndarray] | None = None,
    tokens_dtype: type[np.number] = np.int32,
) -> PackedRows:
    """Rows of ``seq_length + 1`` positions from documents ``token_ids`` (and their [C, n] ``structure``)."""
    if not token_ids:
        raise ValueError("pack: no documents")
    if structure is not None and len(structure) != len(token_ids):
        raise ValueError(f"pack: {len(token_ids)} documents but {len(structure)} structure arrays")
    lengths = np.array([len(t) + 1 for t in token_ids], dtype=np.int64)  # each document ends with EOS
    total = int(lengths.sum())
    rows = max(1, math.ceil((total - 1) / seq_length))
    padded = rows * seq_length + 1

    tokens = np.full(padded, pad_id, dtype=tokens_dtype)
    doc_ids = np.full(padded, -1, dtype=np.int32)
    positions = np.zeros(padded, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for ids, start in zip(token_ids, starts, strict=True):
        tokens[start : start + len(ids)] = ids
        tokens[start + len(ids)] = eos_id
    doc_ids[:total] = np.repeat(np.arange(len(token_ids), dtype=np.int32), lengths)
    positions[:total] = np.arange(total) - np.repeat(starts, lengths)
    mask = np.zeros(padded, dtype=np.uint8)
    mask[:total] = 1

    index = np.arange(rows)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    packed_structure = None
    if structure is not None:
        channels = structure[0].shape[0]
        stream = np.zeros((channels, padded), dtype=STRUCTURE_DTYPE)
        for s, start, n in zip(structure, starts, lengths, strict=True):
            if s.shape != (channels, n - 1):
                raise ValueError(f"pack: structure of shape {s.shape} for a document of {n - 1} tokens")
            stream[:, start : start + n - 1] = s
        packed_structure = np.ascontiguousarray(stream[:, index].transpose(1, 0, 2))
    return PackedRows(tokens[index], doc_ids[index], positions[index], mask[index], packed_structure)


def write_rows(rows: PackedRows, prefix: Path) -> list[str]:
    """Write every field as ``<prefix>.<field>.bin/.idx``; returns the field names written."""
    # Imported here: importing megatron.core costs seconds of CPU, which --dry-run should not pay.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    written = []
    for name, array in rows.fields().items():
        field_prefix = f"{prefix}.{name}"
        builder = IndexedDatasetBuilder(get_bin_path(field_prefix), dtype=array.dtype.type)
        flat = array.reshape(rows.num_rows, -1)
        builder.add_document(flat.reshape(-1), lengths=[flat.shape[1]] * rows.num_rows)
        builder.finalize(get_idx_path(field_prefix))
        written.append(name)
    return written

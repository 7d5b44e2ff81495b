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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nam_trainer.data.shards import ShardWriter
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


class RowPacker:
    """Documents in, rows out, as they arrive: the rows of all documents added are those the whole
    stream would be cut into, so rows never depend on how the documents were batched."""

    FLUSH_TOKENS = 1 << 20  # pending stream positions before complete rows are cut off

    def __init__(
        self,
        seq_length: int,
        eos_id: int,
        pad_id: int,
        channels: int = 0,
        tokens_dtype: type[np.number] = np.int32,
    ) -> None:
        self.seq_length, self.eos_id, self.pad_id, self.channels = seq_length, eos_id, pad_id, channels
        self.tokens_dtype = tokens_dtype
        self.documents = 0
        self._rows_cut = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._pending_len = 0

    def add(self, ids: np.ndarray, structure: np.ndarray | None = None) -> PackedRows | None:
        """Queue one document (and its [channels, len(ids)] structure); returns rows once enough are complete."""
        n = len(ids) + 1  # the document ends with EOS
        if (structure is None) != (self.channels == 0):
            raise ValueError(f"pack: structure given for {self.channels} channels: {structure is not None}")
        if structure is not None and structure.shape != (self.channels, n - 1):
            raise ValueError(f"pack: structure of shape {structure.shape} for a document of {n - 1} tokens")
        tokens = np.empty(n, dtype=self.tokens_dtype)
        tokens[:-1], tokens[-1] = ids, self.eos_id
        padded_structure = None
        if structure is not None:
            padded_structure = np.zeros((self.channels, n), dtype=STRUCTURE_DTYPE)
            padded_structure[:, :-1] = structure
        doc = np.full(n, self.documents, dtype=np.int32)
        self._pending.append((tokens, doc, np.arange(n, dtype=np.int32), padded_structure))
        self._pending_len += n
        self.documents += 1
        return self._cut(final=False) if self._pending_len >= self.FLUSH_TOKENS else None

    def finish(self) -> PackedRows | None:
        """The last rows: the remaining stream padded to a whole row (at least one row in all)."""
        if not self.documents:
            raise ValueError("pack: no documents")
        return self._cut(final=True)

    def _cut(self, final: bool) -> PackedRows | None:
        L = self.seq_length
        tokens, doc_ids, positions = (np.concatenate([p[k] for p in self._pending]) for k in range(3))
        structure = (
            np.concatenate([p[3] for p in self._pending], axis=1) if self.channels else None  # type: ignore[misc]
        )
        n = len(tokens)
        mask = np.ones(n, dtype=np.uint8)
        rows = (n - 1) // L  # rows whose L + 1 positions are all here; row r starts at r L
        if final and (n > 1 + rows * L or self._rows_cut + rows == 0):
            rows += 1
            pad = rows * L + 1 - n
            tokens = np.concatenate([tokens, np.full(pad, self.pad_id, dtype=self.tokens_dtype)])
            doc_ids = np.concatenate([doc_ids, np.full(pad, -1, dtype=np.int32)])
            positions = np.concatenate([positions, np.zeros(pad, dtype=np.int32)])
            mask = np.concatenate([mask, np.zeros(pad, dtype=np.uint8)])
            if structure is not None:
                structure = np.concatenate(
                    [structure, np.zeros((self.channels, pad), STRUCTURE_DTYPE)], axis=1
                )
        keep = slice(rows * L, n)  # the last position of the last row starts the next one
        self._pending = [
            (tokens[keep], doc_ids[keep], positions[keep], None if structure is None else structure[:, keep])
        ]
        self._pending_len = n - rows * L
        self._rows_cut += rows
        if rows == 0:
            return None
        index = np.arange(rows)[:, None] * L + np.arange(L + 1)[None, :]
        packed_structure = (
            None if structure is None else np.ascontiguousarray(structure[:, index].transpose(1, 0, 2))
        )
        return PackedRows(tokens[index], doc_ids[index], positions[index], mask[index], packed_structure)


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
    channels = structure[0].shape[0] if structure is not None else 0
    packer = RowPacker(seq_length, eos_id, pad_id, channels, tokens_dtype)
    parts = [packer.add(ids, None if structure is None else structure[i]) for i, ids in enumerate(token_ids)]
    parts.append(packer.finish())
    done = [p for p in parts if p is not None]
    return PackedRows(
        *(
            np.concatenate([getattr(p, f) for p in done])
            for f in ("tokens", "document_ids", "position_ids", "loss_mask")
        ),
        None if structure is None else np.concatenate([p.structure for p in done]),  # type: ignore[misc]
    )


class RowWriter:
    """Rows appended chunk by chunk to one megatron indexed dataset per field, ``<prefix>.<field>.bin/.idx``,
    one sequence per row, all rows in a single megatron document."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.rows = 0
        self._writers: dict[str, ShardWriter] = {}

    def add(self, rows: PackedRows) -> None:
        for name, array in rows.fields().items():
            writer = self._writers.get(name)
            if writer is None:
                writer = self._writers[name] = ShardWriter(Path(f"{self.prefix}.{name}"), array.dtype)
            for row in array.reshape(rows.num_rows, -1):
                writer.add(row)
        self.rows += rows.num_rows

    def finalize(self) -> list[str]:
        """Close every field; returns the field names written."""
        for writer in self._writers.values():
            writer.finalize()
        return list(self._writers)


def write_rows(rows: PackedRows, prefix: Path) -> list[str]:
    """Write every field as ``<prefix>.<field>.bin/.idx``; returns the field names written."""
    writer = RowWriter(prefix)
    writer.add(rows)
    return writer.finalize()

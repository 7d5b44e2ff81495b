"""Reading packed rows back: a torch Dataset over the megatron indexed datasets of one split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nam_trainer.data.packing import FIELD_DTYPES


class PackedSplit(torch.utils.data.Dataset):
    """Row i as training tensors of length ``seq_length``:

    ``tokens`` (inputs) and ``labels`` (the next tokens), int64; ``loss_mask`` (float32, per
    label); ``document_ids`` and ``position_ids`` (int64, per input: position within the
    document, as nam-embed's n-gram hash and RoPE want them); ``structure``: channel name ->
    int64 values per input (only when the cache has structure channels).
    """

    def __init__(self, prefix: Path, seq_length: int, channels: tuple[str, ...] = ()) -> None:
        # Imported here: importing megatron.core costs seconds of CPU, which --dry-run should not pay.
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        names = ["tokens", "document_ids", "position_ids", "loss_mask", *(["structure"] if channels else [])]
        self.prefix = prefix
        self.seq_length = seq_length
        self.channels = channels
        self._data = {name: IndexedDataset(f"{prefix}.{name}") for name in names}
        rows = {name: len(d) for name, d in self._data.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"{prefix}: fields disagree on the number of rows: {rows}")
        for name, data in self._data.items():
            width = (seq_length + 1) * (len(channels) if name == "structure" else 1)
            if not (data.sequence_lengths == width).all():
                raise ValueError(f"{prefix}.{name}: rows are not {width} long")
            expected = FIELD_DTYPES.get(name)
            if expected is not None and data.index.dtype != expected:
                raise ValueError(
                    f"{prefix}.{name}: dtype {data.index.dtype.__name__}, expected {expected.__name__}"
                )

    def document_names(self) -> list[str]:
        """The names of the split's documents, in the order ``document_ids`` count them (written by
        preparation beside the fields)."""
        return self.prefix.with_name(f"{self.prefix.name}.documents").read_text().splitlines()

    def __len__(self) -> int:
        return len(self._data["tokens"])

    def __getitem__(self, i: int) -> dict[str, Tensor | dict[str, Tensor]]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {self.prefix} with {len(self)} rows")
        row = {name: np.asarray(d[i]) for name, d in self._data.items()}
        tokens = torch.from_numpy(row["tokens"].astype(np.int64))
        out: dict[str, Tensor | dict[str, Tensor]] = {
            "tokens": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": torch.from_numpy(row["loss_mask"][1:].astype(np.float32)),
            "document_ids": torch.from_numpy(row["document_ids"][:-1].astype(np.int64)),
            "position_ids": torch.from_numpy(row["position_ids"][:-1].astype(np.int64)),
        }
        if self.channels:
            s = row["structure"].reshape(len(self.channels), self.seq_length + 1)[:, :-1].astype(np.int64)
            out["structure"] = {name: torch.from_numpy(s[c]) for c, name in enumerate(self.channels)}
        return out

"""Which packed rows each step reads: deterministic, sharded over data-parallel ranks, resumable.

Training walks the rows of the split in a fresh seeded permutation per epoch; sample ``i`` of the
run (counting from 0 over all steps) is row ``perm[epoch(i)][i % rows]``. The global batch of a
step is the next ``global_batch_size`` samples after those consumed; data-parallel rank ``r`` takes
the ``r``-th contiguous slice of it and cuts it into micro-batches. So the samples of a step depend
only on the consumed count, never on the world size, and a resumed run reads exactly what the
uninterrupted one would have. Validation reads the same leading rows every time, so its curve
compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nam_spec.documents import document_boundaries
from nam_trainer.data import PackedSplit


@dataclass(frozen=True)
class Shard:
    """This rank's part of every global batch."""

    global_batch: int
    micro_batch: int
    dp_rank: int
    dp_size: int

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.dp_size

    @property
    def microbatches(self) -> int:
        return self.per_rank // self.micro_batch

    def rows(self, samples: list[int]) -> list[list[int]]:
        """This rank's micro-batches (lists of row indices) of one global batch's samples."""
        mine = samples[self.dp_rank * self.per_rank : (self.dp_rank + 1) * self.per_rank]
        m = self.micro_batch
        return [mine[i : i + m] for i in range(0, len(mine), m)]


class TrainOrder:
    """Sample index -> row of the training split, one seeded permutation per epoch."""

    def __init__(self, rows: int, seed: int) -> None:
        self.num_rows, self.seed = rows, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def row(self, sample: int) -> int:
        epoch = sample // self.num_rows
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_rows, generator=gen)
        return int(self._perm[sample % self.num_rows])

    def global_batch(self, consumed: int, size: int) -> list[int]:
        return [self.row(i) for i in range(consumed, consumed + size)]


def collate(
    split: PackedSplit, rows: list[int], device: torch.device, structure: bool, document_masking: bool
) -> dict[str, Any]:
    """One micro-batch: the model's keyword arguments, plus ``loss_mask`` and ``document_ids``.
    With ``document_masking`` the model gets the documents' boundaries as ``packed_seq_params``,
    derived here from the CPU copy of the ids (their number is data-dependent: no device sync)."""
    items = [split[i] for i in rows]
    batch: dict[str, Any] = {
        "input_ids": torch.stack([it["tokens"] for it in items]),
        "position_ids": torch.stack([it["position_ids"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
        "loss_mask": torch.stack([it["loss_mask"] for it in items]),
        "document_ids": torch.stack([it["document_ids"] for it in items]),
    }
    if structure:
        batch["structure"] = {
            name: torch.stack([it["structure"][name] for it in items]) for name in split.channels
        }
    if document_masking:
        batch["packed_seq_params"] = document_boundaries(batch["document_ids"], device)
    return _to(batch, device)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def validation_samples(split: PackedSplit, batches: int, global_batch: int) -> list[list[int]]:
    """The rows of each validation batch: the split's leading rows, wrapping if it is short."""
    n = len(split)
    return [[(b * global_batch + i) % n for i in range(global_batch)] for b in range(batches)]

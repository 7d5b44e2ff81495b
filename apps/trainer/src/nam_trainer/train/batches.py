"""Which packed rows each step reads: deterministic, sharded over data-parallel ranks, resumable.

Training walks each source's rows in a fresh seeded permutation per epoch, the sources interleaved
by weight (``TrainOrder``); sample ``i`` of the run (counting from 0 over all steps) is a (source, row)
pair that depends on i, the weights and the seed only. The global batch of a
step is the next ``global_batch_size`` samples after those consumed; data-parallel rank ``r`` takes
the ``r``-th contiguous slice of it and cuts it into micro-batches. So the samples of a step depend
only on the consumed count, never on the world size, and a resumed run reads exactly what the
uninterrupted one would have. Validation reads the same leading rows every time, so its curve
compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nam_spec.documents import document_boundaries, has_boundaries
from nam_trainer.data.dataset import PackedSplit


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

    def rows(self, samples: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches (lists of row indices) of one global batch's samples."""
        mine = samples[self.dp_rank * self.per_rank : (self.dp_rank + 1) * self.per_rank]
        m = self.micro_batch
        return [mine[i : i + m] for i in range(0, len(mine), m)]


class TrainOrder:
    """Sample index -> (source, row of its training split).

    Sources are interleaved by weight as megatron's BlendedDataset does (``build_blending_indices``):
    sample i goes to the source whose share falls furthest behind its weight, ``argmax(w * max(i, 1)
    - taken)``, first source on ties; the k-th sample of a source is row ``perm[epoch(k)][k % rows]``
    of its own seeded permutation per epoch. One source is sampled exactly as before sources had weights.
    """

    def __init__(self, rows: list[int], weights: list[float], seed: int) -> None:
        self.rows, self.seed = rows, seed
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self._taken = np.zeros(len(rows), dtype=np.int64)
        self._source: list[int] = []  # of each sample assigned so far
        self._rank: list[int] = []  # the sample's index among its source's samples
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def row(self, sample: int) -> tuple[int, int]:
        while len(self._source) <= sample:
            i = len(self._source)
            s = int(np.argmax(self.weights * max(i, 1) - self._taken))
            self._source.append(s)
            self._rank.append(int(self._taken[s]))
            self._taken[s] += 1
        s, k = self._source[sample], self._rank[sample]
        epoch = k // self.rows[s]
        if (s, epoch) not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + s * 7_919)
            self._perms = {
                (s2, e): p for (s2, e), p in self._perms.items() if s2 != s
            }  # one epoch per source
            self._perms[s, epoch] = torch.randperm(self.rows[s], generator=gen)
        return s, int(self._perms[s, epoch][k % self.rows[s]])

    def global_batch(self, consumed: int, size: int) -> list[tuple[int, int]]:
        return [self.row(i) for i in range(consumed, consumed + size)]


def collate(
    splits: list[PackedSplit],
    rows: list[tuple[int, int]],
    device: torch.device,
    structure: bool,
    document_masking: bool,
) -> dict[str, Any]:
    """One micro-batch of (source, row) pairs: the model's keyword arguments, plus ``loss_mask`` and
    ``document_ids``. With ``document_masking`` the model gets the documents' boundaries as
    ``packed_seq_params``, derived here from the CPU copy of the ids (their number is data-dependent:
    no device sync)."""
    items = [splits[s][i] for s, i in rows]
    batch: dict[str, Any] = {
        "input_ids": torch.stack([it["tokens"] for it in items]),
        "position_ids": torch.stack([it["position_ids"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
        "loss_mask": torch.stack([it["loss_mask"] for it in items]),
        "document_ids": torch.stack([it["document_ids"] for it in items]),
    }
    if structure:
        batch["structure"] = {
            name: torch.stack([it["structure"][name] for it in items]) for name in splits[0].channels
        }
    if document_masking and has_boundaries(batch["document_ids"]):
        batch["packed_seq_params"] = document_boundaries(batch["document_ids"], device)
    return _to(batch, device)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def validation_samples(
    source: int, split: PackedSplit, batches: int, global_batch: int
) -> list[list[tuple[int, int]]]:
    """The (source, row) pairs of each validation batch of one source: its split's leading rows,
    wrapping if it is short."""
    n = len(split)
    return [[(source, (b * global_batch + i) % n) for i in range(global_batch)] for b in range(batches)]

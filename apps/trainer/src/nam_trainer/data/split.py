"""Deterministic train/validation split by document (file or record), by name and seed only."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from nam_trainer.data.corpus import CorpusError, Document


def split_documents(
    documents: Sequence[Document], validation_fraction: float, seed: int
) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """(train, validation), each in the order of ``documents``.

    Documents are ranked by sha256(seed, name) and the first ceil(fraction x n) go to validation
    (at least one and at most n - 1 when the fraction is above 0): the split depends on names and
    the seed only, so it is the same on every machine and every run.
    """
    if validation_fraction <= 0:
        return tuple(documents), ()
    if len(documents) < 2:
        raise CorpusError(
            f"data.validation_fraction = {validation_fraction} needs at least 2 documents to split, "
            f"the corpus has {len(documents)}; add documents or set data.validation_fraction = 0"
        )
    n_val = min(max(math.ceil(validation_fraction * len(documents)), 1), len(documents) - 1)
    ranked = sorted(documents, key=lambda d: hashlib.sha256(f"{seed}\0{d.name}".encode()).digest())
    val_names = {d.name for d in ranked[:n_val]}
    train = tuple(d for d in documents if d.name not in val_names)
    valid = tuple(d for d in documents if d.name in val_names)
    return train, valid

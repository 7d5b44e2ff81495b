"""Work units of the packed-rows build: fixed groups of one source's files, each tokenized (with its
structure channels) by one worker process into a shard of its own in the work directory.

Units depend only on the corpus (a source's files in order, a unit closed once it holds
``UNIT_BYTES`` of text; a file is never split), never on the number of workers, and the final
pass packs their documents in unit order, so the rows are the same with 1 worker or 16. A unit is
written under a temporary name and renamed into place with ``done.json`` (its facts and every
file's size) inside: a restart reuses every complete unit and rebuilds the rest, and a half-written
unit is never read.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nam_trainer.data.corpus import Document, read_texts
from nam_trainer.data.shards import ShardWriter
from nam_trainer.data.structure import CHANNELS, cpp_structure, unknown_structure

UNIT_BYTES = (
    2 << 20
)  # small enough to spread a 100 MB corpus over 16 workers, large enough to amortise a unit's files
DONE = "done.json"
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Unit:
    index: int
    source: int
    text_key: str
    documents: tuple[Document, ...]
    validation: tuple[bool, ...]  # per document: in the validation split

    @property
    def name(self) -> str:
        return f"unit-{self.index:06d}"

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.documents)


@dataclass(frozen=True)
class UnitJob:
    """What every unit's worker needs besides the unit."""

    work_dir: Path
    tokenizer_path: Path
    tokens_dtype: str  # numpy dtype name
    structure: bool


def plan_units(
    source: int, text_key: str, documents: Sequence[Document], validation: frozenset[str], first_index: int
) -> list[Unit]:
    """The units of one source's ``documents`` (in corpus order), numbered from ``first_index``."""
    units: list[Unit] = []
    current: list[Document] = []
    size = 0

    def close() -> None:
        nonlocal current, size
        if current:
            flags = tuple(d.name in validation for d in current)
            units.append(Unit(first_index + len(units), source, text_key, tuple(current), flags))
        current, size = [], 0

    for i, doc in enumerate(documents):
        current.append(doc)
        size += doc.nbytes
        last_of_file = i + 1 == len(documents) or documents[i + 1].path != doc.path
        if size >= UNIT_BYTES and last_of_file:
            close()
    close()
    return units


def completed(work_dir: Path, unit: Unit) -> dict[str, Any] | None:
    """The facts of ``unit`` when its shard is complete in ``work_dir``, else None."""
    folder = work_dir / unit.name
    try:
        done = json.loads((folder / DONE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for name, size in done["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return done


_TOKENIZERS: dict[Path, Any] = {}


def build_unit(task: tuple[Unit, UnitJob]) -> dict[str, Any]:
    """Tokenize ``unit`` (and extract its structure) into its shard; returns its facts (runs in a worker)."""
    from tokenizers import Tokenizer

    unit, job = task
    tokenizer = _TOKENIZERS.get(job.tokenizer_path)
    if tokenizer is None:
        tokenizer = Tokenizer.from_file(str(job.tokenizer_path))
        tokenizer.encode_special_tokens = True  # as load_tokenizer: special-token text stays text
        _TOKENIZERS[job.tokenizer_path] = tokenizer
    tmp = job.work_dir / f".tmp-{unit.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        dtypes = {"tokens": np.dtype(job.tokens_dtype), "structure": np.dtype(np.uint16)}
        writers: dict[tuple[str, str], ShardWriter] = {}  # a split's files only once it has a document

        def add(split: str, f: str, array: np.ndarray) -> None:
            if (split, f) not in writers:
                writers[split, f] = ShardWriter(tmp / f"{split}.{f}", dtypes[f])
            writers[split, f].add(array)

        facts: dict[str, Any] = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
        facts["no_structure"] = 0
        docs = list(read_texts(unit.documents, unit.text_key))
        encodings = tokenizer.encode_batch([text for _, text in docs], add_special_tokens=False)
        for (_, text), encoding, is_validation in zip(docs, encodings, unit.validation, strict=True):
            split = SPLITS[is_validation]
            ids = np.asarray(encoding.ids, dtype=dtypes["tokens"])
            add(split, "tokens", ids)
            if job.structure:
                structure = cpp_structure(text, encoding.offsets)
                if structure is None:
                    facts["no_structure"] += 1
                    structure = unknown_structure(len(ids))
                add(split, "structure", structure.reshape(-1))
            facts[split]["documents"] += 1
            facts[split]["tokens"] += len(ids)
        for writer in writers.values():
            writer.finalize()
        facts["bytes"] = unit.nbytes
        facts["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        with (tmp / DONE).open("w") as f:  # last: its presence says the unit is whole
            json.dump(facts, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, job.work_dir / unit.name)
        except OSError:  # another builder finished the same unit first; theirs has the same content
            if completed(job.work_dir, unit) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return facts


# megatron-core's indexed dataset, version 1 (megatron/core/datasets/indexed_dataset.py): the .idx
# header, then its dtype codes
def unit_documents(
    work_dir: Path, unit: Unit, split: str, structure: bool
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(token ids, [channels, tokens] structure or None) of each ``split`` document of a complete unit."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    folder = work_dir / unit.name
    if not (folder / f"{split}.tokens.idx").exists():  # the unit has no document of this split
        return
    tokens = IndexedDataset(str(folder / f"{split}.tokens"))
    channels = IndexedDataset(str(folder / f"{split}.structure")) if structure else None
    for i in range(len(tokens)):
        ids = np.asarray(tokens[i])
        yield ids, None if channels is None else np.asarray(channels[i]).reshape(len(CHANNELS), len(ids))

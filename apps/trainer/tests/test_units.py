"""A unit's shard: megatron's indexed-dataset format written without megatron (byte for byte what
its builder writes, read back by its reader), by a worker that imports neither torch nor megatron.

Megatron is imported inside the tests only: a spawned worker imports this module for its task.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from nam_trainer.config.schema import SourceConfig
from nam_trainer.data.corpus import read_texts, scan_corpus
from nam_trainer.data.shards import ShardWriter
from nam_trainer.data.tokenizer import train_bpe
from nam_trainer.data.units import SPLITS, Unit, UnitJob, build_unit, plan_units, unit_documents
from nam_trainer.data.workers import Workers


@pytest.fixture
def unit_job(header_slice: list[Path], tmp_path: Path) -> tuple[Unit, UnitJob]:
    """All of ``header_slice`` as one unit with both splits, and a small BPE trained on it."""
    source = SourceConfig(path=str(header_slice[0].parent))
    docs = scan_corpus([source]).documents
    tokenizer = train_bpe((text for _, text in read_texts(docs, "text")), 300, 2, ["<eos>", "<pad>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (unit,) = plan_units(0, "text", docs, frozenset({docs[1].name}), 0)
    return unit, UnitJob(tmp_path / "work", tmp_path / "tokenizer.json", "uint16", structure=True)


def _megatron_shard(prefix: Path, arrays: list[np.ndarray], dtype: type[np.number]) -> None:
    """The shard megatron's builder writes: add_item per array, one end_document (as units did)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for array in arrays:
        builder.add_item(torch.from_numpy(np.ascontiguousarray(array)))
    builder.end_document()
    builder.finalize(f"{prefix}.idx")


def _same_files(ours: Path, theirs: Path) -> None:
    for suffix in (".bin", ".idx"):
        a, b = Path(f"{ours}{suffix}").read_bytes(), Path(f"{theirs}{suffix}").read_bytes()
        assert a == b, f"{ours}{suffix} differs from megatron's ({len(a)} vs {len(b)} bytes)"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_shard_writer_writes_what_megatron_writes_and_reads(dtype: type[np.number], tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = np.random.default_rng(0)
    high = min(np.iinfo(dtype).max, 70_000)
    arrays = [rng.integers(0, high, n).astype(dtype) for n in (5, 0, 1, 300)]
    arrays.append(rng.integers(0, high, (5, 7)).astype(dtype).reshape(-1))  # as structure channels
    writer = ShardWriter(tmp_path / "ours", np.dtype(dtype))
    for array in arrays:
        writer.add(array)
    writer.finalize()
    _megatron_shard(tmp_path / "theirs", arrays, dtype)
    _same_files(tmp_path / "ours", tmp_path / "theirs")
    read = IndexedDataset(str(tmp_path / "ours"))
    assert read.index.dtype == dtype and len(read) == len(arrays)
    for i, array in enumerate(arrays):
        np.testing.assert_array_equal(read[i], array)


def test_a_unit_shard_is_what_megatron_writes_for_its_documents(unit_job: tuple[Unit, UnitJob]) -> None:
    unit, job = unit_job
    facts = build_unit((unit, job))
    folder = job.work_dir / unit.name
    for split in SPLITS:
        # copies: the arrays view megatron's memory map, unmapped once the generator is done
        docs = [
            (ids.copy(), s.copy()) for ids, s in unit_documents(job.work_dir, unit, split, structure=True)
        ]
        assert len(docs) == facts[split]["documents"] > 0
        _megatron_shard(folder / f"{split}.theirs-tokens", [ids for ids, _ in docs], np.uint16)
        _megatron_shard(folder / f"{split}.theirs-structure", [s.reshape(-1) for _, s in docs], np.uint16)
        for f in ("tokens", "structure"):
            _same_files(folder / f"{split}.{f}", folder / f"{split}.theirs-{f}")


def _scan_and_build_then_heavy_modules(task: tuple[Unit, UnitJob, str]) -> list[str]:
    """In a worker: the corpus scan's tasks and a unit; then the torch and megatron modules loaded."""
    unit, job, source = task
    scan_corpus([SourceConfig(path=source)])
    build_unit((unit, job))
    return sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "megatron"})


def test_a_worker_imports_neither_torch_nor_megatron(unit_job: tuple[Unit, UnitJob]) -> None:
    unit, job = unit_job
    with Workers(2) as workers:
        (loaded,) = workers.imap(_scan_and_build_then_heavy_modules, [(unit, job, str(job.work_dir.parent))])
    assert loaded == []
    assert (job.work_dir / unit.name / "done.json").is_file()

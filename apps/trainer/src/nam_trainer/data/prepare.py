"""From configuration to datasets: corpus scan -> split per source -> tokenizer -> units tokenized by
the worker pool -> packed rows per source in the cache.

Every rank may call it: the process that claims an entry builds it while the others wait for it
(on one host or several), then verify and open it. Memory stays bounded by a unit's texts and a
row chunk; the corpus is never held whole (only its document list: names, sizes, digests).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nam_trainer.config.schema import Config, DataConfig
from nam_trainer.data.cache import FORMAT, cache_key, load_or_build, problem, read_manifest
from nam_trainer.data.corpus import Corpus, Document, Mapper, fingerprint, read_texts, scan_corpus
from nam_trainer.data.packing import RowPacker, RowWriter, token_dtype
from nam_trainer.data.split import split_documents
from nam_trainer.data.structure import CHANNELS, extractor_version
from nam_trainer.data.tokenizer import FILE as TOKENIZER_FILE
from nam_trainer.data.tokenizer import (
    LoadedTokenizer,
    load_tokenizer,
    prepare_tokenizer,
    tokenizer_key_inputs,
)
from nam_trainer.data.units import Unit, UnitJob, build_unit, completed, plan_units, unit_documents
from nam_trainer.data.workers import Workers

if TYPE_CHECKING:
    from nam_trainer.data.dataset import PackedSplit

SPLITS = ("train", "validation")
REPORT_EVERY_S = 10.0


@dataclass(frozen=True)
class CorpusPlan:
    """The documents and their split per source: everything that is cheap to know before building."""

    corpus: Corpus
    splits: tuple[tuple[tuple[Document, ...], tuple[Document, ...]], ...]  # per source: (train, validation)

    @property
    def train(self) -> tuple[Document, ...]:
        return tuple(d for train, _ in self.splits for d in train)

    @property
    def validation(self) -> tuple[Document, ...]:
        return tuple(d for _, validation in self.splits for d in validation)

    def train_texts(self) -> Iterator[str]:
        """The training split's texts in order, read one file at a time."""
        for source, (train, _) in zip(self.corpus.sources, self.splits, strict=True):
            for _, text in read_texts(train, source.config.text_key):
                yield text


@dataclass(frozen=True)
class SourceData:
    """One source's packed rows: rows never mix sources."""

    origin: str
    weight: float
    train: PackedSplit
    validation: PackedSplit | None


@dataclass(frozen=True)
class PreparedData:
    tokenizer: LoadedTokenizer
    entry: Path  # the packed cache entry
    sources: tuple[SourceData, ...]
    info: dict[
        str, Any
    ]  # the manifest's facts: documents, tokens and rows per source and split, corpus origin

    @property
    def channels(self) -> tuple[str, ...]:
        return self.sources[0].train.channels

    def trained_on(self) -> dict[str, Any]:
        """What weights trained on this data depend on besides the model, for the checkpoints: the
        tokenizer (its file's sha256, vocabulary and special ids; its path for messages only) and the
        packed rows (the key inputs of their cache entry: each split's documents, row length, structure
        channels, the tokenizer; the configured sources for messages only)."""
        tok = self.tokenizer
        return {
            "tokenizer": {
                "sha256": tok.sha256,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "pad_id": tok.pad_id,
                "path": str(tok.path),
            },
            "data": {"rows": read_manifest(self.entry)["key_inputs"], "sources": self.info["corpus"]},
        }


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser()


def worker_count(cfg: DataConfig) -> int:
    return cfg.workers or len(os.sched_getaffinity(0))


def plan_corpus(cfg: DataConfig, imap: Mapper = map) -> CorpusPlan:
    corpus = scan_corpus(cfg.sources, compiler=cfg.compiler, imap=imap)
    splits = tuple(
        split_documents(s.documents, cfg.validation_fraction, cfg.split_seed) for s in corpus.sources
    )
    return CorpusPlan(corpus, splits)


def packed_key_inputs(
    cfg: DataConfig, seq_length: int, plan: CorpusPlan, tokenizer: LoadedTokenizer
) -> dict[str, Any]:
    """Everything the packed rows depend on; any change gives another cache entry. (Weights are not:
    they choose among the rows, at training time.)"""
    return {
        "kind": "packed rows",
        "format": FORMAT,
        "sources": [
            {"train": fingerprint(train), "validation": fingerprint(validation)}
            for train, validation in plan.splits
        ],
        "tokenizer": tokenizer.sha256,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "seq_length": seq_length,
        "structure": extractor_version() if cfg.structure == "cpp" else "none",
    }


def prepare_data(cfg: Config, log: Callable[[str], None] = print) -> PreparedData:
    """Build what is missing or bad in the cache, verify the rest, and open the packed splits: a
    tokenizer of at most ``model.vocab_size`` tokens, rows of ``model.seq_length``."""
    # Imported here: it imports torch, which the worker processes (they import this package) should not pay for.
    from nam_trainer.data.dataset import PackedSplit

    data = cfg.data
    with Workers(worker_count(data)) as workers:
        plan = plan_corpus(data, workers.imap)
        corpus = plan.corpus
        log(
            f"corpus: {len(corpus.documents)} documents, {corpus.num_bytes:,} bytes from {corpus.origin}"
            + (f" (skipped {corpus.skipped})" if corpus.skipped else "")
        )
        root = cache_root(data)
        tokenizer = prepare_tokenizer(
            cfg.tokenizer, cfg.model.vocab_size, plan.train, plan.train_texts(), root, log
        )
        key_inputs = packed_key_inputs(data, cfg.model.seq_length, plan, tokenizer)
        work_dir = root / "packed" / f".work-{cache_key(key_inputs)}"
        builder = _RowsBuild(
            plan, tokenizer, cfg.model.seq_length, data.structure == "cpp", work_dir, workers, log
        )
        entry = load_or_build(root, "packed", key_inputs, builder.build, log)
    shutil.rmtree(work_dir, ignore_errors=True)  # the units of a finished build
    info = read_manifest(entry)["info"]
    for i, facts in enumerate(info["sources"]):  # once, whether just built or found in the cache
        for split in (s for s in SPLITS if s in facts):
            f = facts[split]
            log(
                f"data: source {i} {split}: {f['documents']} documents, {f['tokens']:,} tokens, {f['rows']} rows"
            )
    channels = CHANNELS if data.structure == "cpp" else ()
    sources = tuple(
        SourceData(
            facts["origin"],
            source.config.weight,
            *(
                PackedSplit(entry / f"{split}-{i}", cfg.model.seq_length, channels)
                if split in facts
                else None
                for split in SPLITS
            ),
        )
        for i, (facts, source) in enumerate(zip(info["sources"], corpus.sources, strict=True))
    )
    return PreparedData(tokenizer, entry, sources, info)  # type: ignore[arg-type]


@dataclass
class _RowsBuild:
    """The packed-rows entry: units tokenized by the workers and packed in order as they are done."""

    plan: CorpusPlan
    tokenizer: LoadedTokenizer
    seq_length: int
    structure: bool
    work_dir: Path
    workers: Workers
    log: Callable[[str], None]

    def build(self, out: Path) -> dict[str, Any]:
        units = self._units()
        job = UnitJob(self.work_dir, self.tokenizer.path, np.dtype(self._dtype).name, self.structure)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        facts = {u.index: f for u in units if (f := completed(self.work_dir, u)) is not None}
        todo = [u for u in units if u.index not in facts]
        if facts:
            self.log(f"data: reusing {len(facts)} of {len(units)} units finished before in {self.work_dir}")
        progress = _Progress(len(todo), sum(u.nbytes for u in todo), self.log)
        built = self.workers.imap(build_unit, [(u, job) for u in todo])  # in todo's order
        streams = self._streams(out)
        # Each unit is packed as soon as it and every unit before it are done, while the workers go
        # on with the later ones: the pack is one process, which after the last unit would be a
        # serial phase growing with the corpus. Each (source, split) stream takes its units in
        # order, so the rows are the same at any worker count.
        for unit in units:
            if unit.index not in facts:
                facts[unit.index] = next(built)
                progress.update(len({d.path for d in unit.documents}), unit.nbytes, facts[unit.index])
            for split in SPLITS:
                if (stream := streams.get((unit.source, split))) is not None:
                    for ids, structure in unit_documents(self.work_dir, unit, split, self.structure):
                        stream.add(ids, structure)
        progress.done()
        return self._summary(units, facts, streams, out)

    @property
    def _dtype(self) -> type[np.number]:
        return token_dtype(self.tokenizer.vocab_size)

    def _units(self) -> list[Unit]:
        units: list[Unit] = []
        for i, (source, (_, validation)) in enumerate(
            zip(self.plan.corpus.sources, self.plan.splits, strict=True)
        ):
            names = frozenset(d.name for d in validation)
            units += plan_units(i, source.config.text_key, source.documents, names, len(units))
        return units

    def _streams(self, out: Path) -> dict[tuple[int, str], _RowStream]:
        """A row stream per source and split that has documents, written to ``<split>-<source>``."""
        channels = len(CHANNELS) if self.structure else 0
        tok = self.tokenizer
        return {
            (i, split): _RowStream(
                RowPacker(self.seq_length, tok.eos_id, tok.pad_id, channels, self._dtype),
                RowWriter(out / f"{split}-{i}"),
            )
            for i, splits in enumerate(self.plan.splits)
            for split, docs in zip(SPLITS, splits, strict=True)
            if docs
        }

    def _summary(
        self,
        units: list[Unit],
        facts: dict[int, dict[str, Any]],
        streams: dict[tuple[int, str], _RowStream],
        out: Path,
    ) -> dict[str, Any]:
        """The streams' last rows written and closed, each split's document list, and the entry's facts."""
        sources = []
        for i, (source, splits) in enumerate(zip(self.plan.corpus.sources, self.plan.splits, strict=True)):
            summary: dict[str, Any] = {"origin": source.origin, "skipped": source.skipped}
            for split, docs in zip(SPLITS, splits, strict=True):
                if not docs:
                    continue
                rows = streams[i, split].finish()
                (out / f"{split}-{i}.documents").write_text("".join(d.name + "\n" for d in docs))
                tokens = sum(facts[u.index][split]["tokens"] for u in units if u.source == i)
                summary[split] = {"documents": len(docs), "tokens": tokens, "rows": rows}
            sources.append(summary)
        return {
            "corpus": self.plan.corpus.origin,
            "skipped": self.plan.corpus.skipped,
            "without_structure": sum(f["no_structure"] for f in facts.values()),
            "sources": sources,
        }


@dataclass
class _RowStream:
    """One split of one source: documents packed into rows and the full rows written as they come."""

    packer: RowPacker
    writer: RowWriter

    def add(self, ids: np.ndarray, structure: np.ndarray | None) -> None:
        if (rows := self.packer.add(ids, structure)) is not None:
            self.writer.add(rows)

    def finish(self) -> int:
        """The last, padded row written and the files closed; returns the rows written."""
        if (rows := self.packer.finish()) is not None:
            self.writer.add(rows)
        self.writer.finalize()
        return self.writer.rows


class _Progress:
    """A line when the first unit is done (the workers' start shows in its time) and then every
    REPORT_EVERY_S seconds while units are built: files, bytes, tokens, rate, ETA."""

    def __init__(self, units: int, total_bytes: int, log: Callable[[str], None]) -> None:
        self.units, self.total_bytes, self.log = units, total_bytes, log
        self.done_units = self.shown_units = self.files = self.bytes = self.tokens = 0
        self.start = self.shown = time.monotonic()

    def update(self, files: int, nbytes: int, facts: dict[str, Any]) -> None:
        self.done_units += 1
        self.files += files
        self.bytes += nbytes
        self.tokens += sum(facts[s]["tokens"] for s in SPLITS)
        if self.done_units == 1 or time.monotonic() - self.shown >= REPORT_EVERY_S:
            self._show()

    def done(self) -> None:
        if self.units and self.shown_units != self.done_units:
            self._show()

    def _show(self) -> None:
        now = time.monotonic()
        self.shown, self.shown_units = now, self.done_units
        rate = self.bytes / max(now - self.start, 1e-9)
        eta = (self.total_bytes - self.bytes) / rate if rate else float("inf")
        self.log(
            f"data: {self.done_units}/{self.units} units, {self.files:,} files, {self.bytes / 1e6:,.1f} MB, "
            f"{self.tokens:,} tokens, {rate / 1e6:.2f} MB/s, ETA {eta:.0f} s"
        )


def cache_status(cfg: Config, plan: CorpusPlan) -> list[str]:
    """What ``prepare_data`` would reuse and what it would build, without building anything."""
    tokenizer_cfg, vocab_size = cfg.tokenizer, cfg.model.vocab_size
    root = cache_root(cfg.data)
    if tokenizer_cfg.path:
        tokenizer = load_tokenizer(Path(tokenizer_cfg.path).expanduser(), tokenizer_cfg, vocab_size)
        lines = [f"tokenizer: {tokenizer.path} ({tokenizer.vocab_size} tokens)"]
    else:
        tok_inputs = tokenizer_key_inputs(tokenizer_cfg, vocab_size, plan.train)
        tok_entry = root / "tokenizer" / cache_key(tok_inputs)
        why = problem(tok_entry, tok_inputs)
        if why is not None:
            return [
                f"tokenizer: to train into {tok_entry} ({why})",
                "packed rows: to build after the tokenizer",
            ]
        tokenizer = load_tokenizer(tok_entry / TOKENIZER_FILE, tokenizer_cfg, vocab_size)
        lines = [f"tokenizer: cached in {tok_entry} ({tokenizer.vocab_size} tokens)"]
    inputs = packed_key_inputs(cfg.data, cfg.model.seq_length, plan, tokenizer)
    entry = root / "packed" / cache_key(inputs)
    why = problem(entry, inputs)
    lines.append(
        f"packed rows: {'cached in' if why is None else 'to build into'} {entry}"
        + (f" ({why})" if why else "")
    )
    return lines

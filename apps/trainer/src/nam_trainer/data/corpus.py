"""The corpus as document references: names, content digests and where to read each text again.

Scanning reads every file once (in the worker pool), keeping per document only its file, record
number, size and sha256, never the texts. Within a source the documents are in the order of
their files (sorted by path) and records; a file two sources name belongs to the first. No
sources means the C++ standard library headers (``toolchain.py``), one source. Files that are not
UTF-8 text (NUL bytes or undecodable), unreadable and empty files, and empty records are skipped
and counted, never silently used; a source left empty is an error.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nam_trainer.config.schema import SourceConfig
from nam_trainer.data.sources import CorpusError, file_text, holds_records, records, source_files, walk
from nam_trainer.data.toolchain import cxx_header_dirs

__all__ = ["Corpus", "CorpusError", "Document", "Source", "fingerprint", "read_texts", "scan_corpus"]

WHOLE_FILE = 0  # the record number of a document that is a whole file


@dataclass(frozen=True, slots=True)
class Document:
    path: str
    record: int  # WHOLE_FILE, or the JSONL line / Parquet row (from 1)
    nbytes: int  # of its UTF-8 text
    digest: bytes  # sha256 of its UTF-8 text

    @property
    def name(self) -> str:
        """Stable identity: the file's path, or path:record."""
        return self.path if self.record == WHOLE_FILE else f"{self.path}:{self.record}"


@dataclass(frozen=True)
class Source:
    config: SourceConfig
    origin: str  # what it was, for messages and the manifest
    documents: tuple[Document, ...]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def num_bytes(self) -> int:
        return sum(d.nbytes for d in self.documents)


@dataclass(frozen=True)
class Corpus:
    sources: tuple[Source, ...]

    @property
    def origin(self) -> str:
        return "; ".join(s.origin for s in self.sources)

    @property
    def documents(self) -> tuple[Document, ...]:
        return tuple(d for s in self.sources for d in s.documents)

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for s in self.sources)

    @property
    def skipped(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.sources:
            total.update(s.skipped)
        return dict(sorted(total.items()))


def fingerprint(documents: Iterable[Document]) -> str:
    """sha256 over names and contents: any added, removed, renamed or edited document changes it."""
    h = hashlib.sha256()
    for d in documents:
        h.update(d.name.encode("utf-8") + b"\0" + d.digest.hex().encode() + b"\n")
    return h.hexdigest()


Mapper = Callable[[Callable, Iterable], Iterator]  # builtin map, or a process pool's ordered imap


def scan_corpus(sources: Sequence[SourceConfig], *, compiler: str = "", imap: Mapper = map) -> Corpus:
    """Every source's documents (or the default C++ headers'), files scanned through ``imap``."""
    if sources:
        listed = [
            (s, s.path, source_files(s, f"data.sources[{i}] = {s.path!r}")) for i, s in enumerate(sources)
        ]
    else:
        dirs = cxx_header_dirs(compiler)
        origin = "C++ standard library headers in " + ", ".join(map(str, dirs))
        listed = [(SourceConfig(path=str(dirs[0])), origin, [f for d in dirs for f in walk(d)])]
    seen: set[Path] = set()
    out = []
    for i, (config, origin, files) in enumerate(listed):
        mine = []
        for path in sorted(files, key=str):
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                mine.append(path)
        skipped: Counter[str] = Counter()
        docs: list[Document] = []
        for found, why in imap(_scan_file, [(p, config.text_key) for p in mine]):
            docs.extend(found)
            skipped.update(why)
        if not docs:
            where = f"data.sources[{i}] = {config.path!r}" if sources else origin
            counted = f"{len(mine)} files" + (f", skipped: {_describe(skipped)}" if skipped else "")
            raise CorpusError(
                f"{where}: no usable text ({counted}); need at least one non-empty text file or record"
            )
        out.append(Source(config, origin, tuple(docs), dict(sorted(skipped.items()))))
    return Corpus(tuple(out))


def _describe(skipped: Counter[str]) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))


def _scan_file(task: tuple[Path, str]) -> tuple[list[Document], Counter[str]]:
    """A file's documents and what of it was skipped (runs in a worker)."""
    path, text_key = task
    if not holds_records(path):
        text, why = file_text(path)
        if text is None:
            return [], Counter([why])
        data = text.encode("utf-8")
        return [Document(str(path), WHOLE_FILE, len(data), hashlib.sha256(data).digest())], Counter()
    docs, skipped = [], Counter[str]()
    try:
        for record, text in records(path, text_key):
            if not text:
                skipped["empty records"] += 1
                continue
            data = text.encode("utf-8")
            docs.append(Document(str(path), record, len(data), hashlib.sha256(data).digest()))
    except CorpusError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, ValueError):  # a damaged file or compressed stream
        return [], Counter(["unreadable files"])
    return docs, skipped


def read_texts(documents: Sequence[Document], text_key: str) -> Iterator[tuple[Document, str]]:
    """The texts of ``documents`` (in order, records of one file ascending), each file opened once;
    a text whose digest no longer matches is a CorpusError (the file changed while preparing)."""
    i = 0
    while i < len(documents):
        path = documents[i].path
        j = i
        while j < len(documents) and documents[j].path == path:
            j += 1
        group = documents[i:j]
        if group[0].record == WHOLE_FILE:
            texts: Iterable[str | None] = [file_text(Path(path))[0]]
        else:
            wanted = {d.record: k for k, d in enumerate(group)}
            found: list[str | None] = [None] * len(group)
            for record, text in records(Path(path), text_key):
                if record in wanted:
                    found[wanted[record]] = text
                    if record == group[-1].record:
                        break
            texts = found
        for doc, text in zip(group, texts, strict=True):
            if text is None or hashlib.sha256(text.encode("utf-8")).digest() != doc.digest:
                raise CorpusError(
                    f"{doc.name}: changed or unreadable since the corpus was scanned; run again"
                )
            yield doc, text
        i = j

"""Documents from the configured sources, in a deterministic order, with a content fingerprint.

A source is a directory (every file below it, recursively, hidden entries skipped), a file, a
glob (``*``, ``?``, ``[...]``, ``**``) or a ``.jsonl`` file (one document per line, the text in
``data.jsonl_text_key``). No sources means the C++ standard library headers (``toolchain.py``).
Files that are not UTF-8 text (NUL bytes or undecodable) and empty files are skipped and
counted, never silently used; a corpus left empty is an error.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nam_trainer.data.toolchain import cxx_header_dirs

_GLOB_CHARS = frozenset("*?[")


class CorpusError(ValueError):
    """A source that does not exist, matches nothing, or holds no usable text."""


@dataclass(frozen=True)
class Document:
    name: str  # stable identity: the file's path, or path:line for a JSONL record
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]
    origin: str  # what the sources were, for messages and the manifest
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def num_bytes(self) -> int:
        return sum(len(d.text.encode("utf-8")) for d in self.documents)


def fingerprint(documents: Sequence[Document]) -> str:
    """sha256 over names and contents: any added, removed, renamed or edited document changes it."""
    h = hashlib.sha256()
    for d in documents:
        h.update(d.name.encode("utf-8") + b"\0" + d.digest.encode() + b"\n")
    return h.hexdigest()


def load_corpus(sources: Sequence[str], *, compiler: str = "", jsonl_text_key: str = "text") -> Corpus:
    """The documents of ``sources`` (or the default C++ headers), sorted by name, duplicates removed."""
    if sources:
        origin = ", ".join(sources)
        files = [f for i, s in enumerate(sources) for f in _expand(s, f"data.sources[{i}] = {s!r}")]
    else:
        dirs = cxx_header_dirs(compiler)
        origin = "C++ standard library headers in " + ", ".join(map(str, dirs))
        files = [f for d in dirs for f in _walk(d)]
    skipped: Counter[str] = Counter()
    seen: set[Path] = set()
    docs: dict[str, Document] = {}
    for path in files:
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        if path.suffix == ".jsonl":
            for doc in _jsonl(path, jsonl_text_key):
                if doc.text:
                    docs[doc.name] = doc
                else:
                    skipped["empty JSONL text"] += 1
            continue
        text, why = _read_text(path)
        if text is None:
            skipped[why] += 1
        else:
            docs[str(path)] = Document(str(path), text)
    if not docs:
        found = f"{len(seen)} files" + (f", skipped: {_describe(skipped)}" if skipped else "")
        raise CorpusError(
            f"the corpus from {origin} is empty ({found}); need at least one non-empty text file"
        )
    return Corpus(tuple(docs[n] for n in sorted(docs)), origin, dict(sorted(skipped.items())))


def _describe(skipped: Counter[str]) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))


def _expand(source: str, where: str) -> list[Path]:
    expanded = os.path.expanduser(source)
    if _GLOB_CHARS & set(expanded):
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise CorpusError(f"{where}: the glob matches nothing")
        return [f for m in matches for f in (_walk(Path(m)) if Path(m).is_dir() else [Path(m)])]
    path = Path(expanded)
    if path.is_dir():
        return _walk(path)
    if path.is_file():
        return [path]
    raise CorpusError(
        f"{where}: no such file or directory (accepted: a directory, a file, a glob or a .jsonl file)"
    )


def _walk(root: Path) -> list[Path]:
    """Regular files below ``root`` in sorted order, skipping hidden files and directories."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return [p for p in out if p.is_file()]


def _read_text(path: Path) -> tuple[str | None, str]:
    data = path.read_bytes()
    if not data.strip():
        return None, "empty files"
    if b"\0" in data:
        return None, "binary files"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "non-UTF-8 files"


def _jsonl(path: Path, key: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{where}: not a JSON object ({err.msg})") from err
            if not isinstance(record, dict) or key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CorpusError(f"{where}: no {key!r} field (found {keys}); set data.jsonl_text_key")
            if not isinstance(record[key], str):
                raise CorpusError(f"{where}: field {key!r} is {type(record[key]).__name__}, need a string")
            yield Document(where, record[key])

"""What a source names, and the texts its files hold, read one file at a time.

A source path is a directory (every file below it, recursively, hidden entries skipped), a file
or a glob (``*``, ``?``, ``[...]``, ``**``); ``include`` keeps only files whose name ends in one of
its endings, ``exclude`` drops those that do. A file named ``*.jsonl``, ``*.jsonl.gz``,
``*.jsonl.zst`` (one JSON object per line) or ``*.parquet`` (one row per record) holds one
document per record, the text in the source's ``text_key``; any other file is one document.
Nothing here holds more than one file's texts.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from nam_trainer.config.schema import SourceConfig

_GLOB_CHARS = frozenset("*?[")
RECORD_ENDINGS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
ACCEPTED = "a directory, a file, a glob, or JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet (.parquet) files"


class CorpusError(ValueError):
    """A source that does not exist, matches nothing, or holds no usable text."""


def source_files(source: SourceConfig, where: str) -> list[Path]:
    """The files of ``source`` in sorted order, filtered by its include/exclude endings."""
    expanded = os.path.expanduser(source.path)
    if _GLOB_CHARS & set(expanded):
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise CorpusError(f"{where}: the glob matches nothing")
        files = [f for m in matches for f in (walk(Path(m)) if Path(m).is_dir() else [Path(m)])]
    elif Path(expanded).is_dir():
        files = walk(Path(expanded))
    elif Path(expanded).is_file():
        files = [Path(expanded)]
    else:
        raise CorpusError(f"{where}: no such file or directory (accepted: {ACCEPTED})")
    kept = [
        f
        for f in files
        if (not source.include or f.name.endswith(tuple(source.include)))
        and not f.name.endswith(tuple(source.exclude))
    ]
    if not kept:
        raise CorpusError(
            f"{where}: none of its {len(files)} files is left by include = {source.include}, "
            f"exclude = {source.exclude}"
        )
    return kept


def walk(root: Path) -> list[Path]:
    """Regular files below ``root`` in sorted order, skipping hidden files and directories."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return [p for p in out if p.is_file()]


def holds_records(path: Path) -> bool:
    return path.name.endswith(RECORD_ENDINGS)


def file_text(path: Path) -> tuple[str | None, str]:
    """The text of a plain file, or None and why it is skipped (the reasons the summary counts)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, "unreadable files"
    if not data.strip():
        return None, "empty files"
    if b"\0" in data:
        return None, "binary files"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "non-UTF-8 files"


def records(path: Path, text_key: str) -> Iterator[tuple[int, str]]:
    """(record number, text) of a JSONL file (line numbers from 1; blank lines skipped) or a Parquet
    file (row numbers from 1); a record without a string ``text_key`` is a CorpusError naming it."""
    if path.name.endswith(".parquet"):
        yield from _parquet(path, text_key)
        return
    with _open_jsonl(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{where}: not a JSON object ({err.msg})") from err
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CorpusError(f"{where}: no {text_key!r} field (found {keys}); set the source's text_key")
            text = record[text_key]
            if not isinstance(text, str):
                raise CorpusError(f"{where}: field {text_key!r} is {type(text).__name__}, need a string")
            yield lineno, text


def _open_jsonl(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        return io.TextIOWrapper(io.BufferedReader(_ZstdFrames(path)), encoding="utf-8")
    return path.open(encoding="utf-8")


class _ZstdFrames(io.RawIOBase):
    """A zstd file's bytes, frame after frame, failing as gzip does on damage: bad data is an OSError
    and a file that ends inside a frame an EOFError (zstandard's stream_reader returns the bytes up
    to a cut as if the file ended there, so a truncated dump would lose its tail silently)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._file = path.open("rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._error = zstandard.ZstdError
        self._frame: Any = None  # the frame being decompressed; None between frames
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._out):
            data = self._file.read(1 << 16)
            if not data:
                if self._frame is not None:
                    raise EOFError("the zstd file ends inside a frame (truncated)")
                return 0
            self._out, self._at = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            try:
                out.append(self._frame.decompress(data))
            except self._error as err:
                raise OSError(f"not zstd data ({err})") from err
            if not self._frame.eof:
                break
            data, self._frame = self._frame.unused_data, None
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _parquet(path: Path, column: str) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(path)
    field = reader.schema_arrow.field(column) if column in reader.schema_arrow.names else None
    if field is None:
        raise CorpusError(
            f"{path}: no column {column!r} (columns: {', '.join(reader.schema_arrow.names)}); set the source's text_key"
        )
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise CorpusError(f"{path}: column {column!r} is {field.type}, need strings")
    row = 0
    for batch in reader.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            yield row, text or ""

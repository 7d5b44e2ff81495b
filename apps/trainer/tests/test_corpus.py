from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from nam_trainer.config.schema import SourceConfig
from nam_trainer.data import CorpusError, ToolchainError, cxx_header_dirs, fingerprint, scan_corpus
from nam_trainer.data.corpus import Corpus, Document, read_texts
from nam_trainer.data.split import split_documents


def _doc(name: str, text: str) -> Document:
    data = text.encode()
    return Document(name, 0, len(data), hashlib.sha256(data).digest())


def load_corpus(paths: list[str], text_key: str = "text") -> Corpus:
    return scan_corpus([SourceConfig(path=p, text_key=text_key) for p in paths])


def test_default_corpus_is_the_compilers_cxx_headers(header_dirs: list[Path]) -> None:
    assert all("c++" in d.parts for d in header_dirs)
    assert any((d / "vector").is_file() for d in header_dirs)  # libstdc++ and libc++ both ship <vector>
    corpus = scan_corpus([])
    names = [d.name for d in corpus.documents]
    assert len(names) > 100 and names == sorted(names)
    assert any(n.endswith("/vector") for n in names)
    assert "C++ standard library headers" in corpus.origin
    assert fingerprint(scan_corpus([]).documents) == fingerprint(corpus.documents)


def test_no_compiler_is_a_clear_error() -> None:
    with pytest.raises(ToolchainError, match="no C\\+\\+ compiler found \\(tried no-such-cxx on PATH\\)"):
        cxx_header_dirs("no-such-cxx")


def test_a_program_that_is_no_compiler_is_a_clear_error() -> None:
    with pytest.raises(ToolchainError, match="printed no include search list"):
        cxx_header_dirs("true")


def test_directory_sources_skip_and_count_what_is_not_text(tmp_path: Path) -> None:
    (tmp_path / "sub" / ".git").mkdir(parents=True)
    (tmp_path / "sub" / "b.hpp").write_text("int b;\n")
    (tmp_path / "a.cc").write_text("int a;\n")
    (tmp_path / "sub" / ".git" / "config").write_text("hidden\n")
    (tmp_path / ".hidden.h").write_text("hidden\n")
    (tmp_path / "blob.o").write_bytes(b"\x7fELF\0\0\1")
    (tmp_path / "latin1.h").write_bytes("// caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.h").write_text("  \n")
    corpus = load_corpus([str(tmp_path)])
    assert [Path(d.name).name for d in corpus.documents] == ["a.cc", "b.hpp"]
    assert corpus.skipped == {"binary files": 1, "empty files": 1, "non-UTF-8 files": 1}


def test_globs_files_and_duplicates(tmp_path: Path, header_slice: list[Path]) -> None:
    for i in range(3):
        (tmp_path / f"f{i}.h").write_text(f"int x{i};\n")
    corpus = load_corpus([str(tmp_path / "f[01].h"), str(tmp_path / "**" / "*.h")])  # a file read once
    assert [[Path(d.name).name for d in s.documents] for s in corpus.sources] == [["f0.h", "f1.h"], ["f2.h"]]
    real = load_corpus([str(p) for p in header_slice])
    assert [d.name for d in real.documents] == [str(p) for p in header_slice]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing-dir", "data.sources\\[0\\] = '.*missing-dir': no such file or directory"),
        ("nothing-*.h", "data.sources\\[0\\] = '.*nothing-\\*.h': the glob matches nothing"),
    ],
)
def test_bad_sources_are_named(tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(CorpusError, match=message):
        load_corpus([str(tmp_path / source)])


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.h").write_text("")
    with pytest.raises(CorpusError, match="no usable text \\(1 files, skipped: 1 empty files\\)"):
        load_corpus([str(tmp_path)])


def test_jsonl_records_are_documents(tmp_path: Path) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"code": "int a;"}) + "\n\n" + json.dumps({"code": "int b;", "x": 1}) + "\n")
    corpus = load_corpus([str(f)], text_key="code")
    texts = [(d.name, text) for d, text in read_texts(corpus.documents, "code")]
    assert texts == [(f"{f}:1", "int a;"), (f"{f}:3", "int b;")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", ":2: not a JSON object"),
        ('{"body": "x"}', ":2: no 'text' field \\(found \\['body'\\]\\); set the source's text_key"),
        ('{"text": 3}', ":2: field 'text' is int, need a string"),
        ('["text"]', ":2: no 'text' field \\(found list\\)"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=message):
        load_corpus([str(f)])


def test_damaged_record_files_are_skipped_and_counted(tmp_path: Path) -> None:
    """Cut or garbled .gz, .zst and .parquet files are "unreadable files", as a bad plain file is;
    a .zst of several frames (zstd -T, concatenated dumps) is read whole."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": f"int v{i}; // {i * 7919}"}) + "\n" for i in range(2000)).encode()
    half = lines.index(b"\n", len(lines) // 2) + 1
    zstd = zstandard.ZstdCompressor()
    (tmp_path / "frames.jsonl.zst").write_bytes(zstd.compress(lines[:half]) + zstd.compress(lines[half:]))
    pq.write_table(pa.table({"text": [f"int p{i};" for i in range(2000)]}), tmp_path / "whole.parquet")
    for name, data in {
        "cut.jsonl.gz": gzip.compress(lines),
        "cut.jsonl.zst": zstd.compress(lines),
        "cut.parquet": (tmp_path / "whole.parquet").read_bytes(),
    }.items():
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    (tmp_path / "garbled.jsonl.gz").write_bytes(b"\x1f\x8b" + bytes(range(256)))
    (tmp_path / "garbled.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(256)))
    corpus = load_corpus([str(tmp_path)])
    assert corpus.skipped == {"unreadable files": 5}
    names = [d.name for d in corpus.documents]
    assert len(names) == 4000 and names[1999].endswith("frames.jsonl.zst:2000")
    assert {Path(d.path).name for d in corpus.documents} == {"frames.jsonl.zst", "whole.parquet"}


def test_fingerprint_sees_edits_and_renames() -> None:
    base = [_doc("a", "x"), _doc("b", "y")]
    assert fingerprint(base) == fingerprint([_doc("a", "x"), _doc("b", "y")])
    assert fingerprint(base) != fingerprint([_doc("a", "x"), _doc("b", "y ")])
    assert fingerprint(base) != fingerprint([_doc("a", "x"), _doc("c", "y")])


def test_split_is_by_document_deterministic_and_order_free() -> None:
    docs = [_doc(f"file{i}.h", str(i)) for i in range(40)]
    train, valid = split_documents(docs, 0.1, seed=0)
    assert len(valid) == 4 and len(train) == 36
    assert {d.name for d in train}.isdisjoint(d.name for d in valid)
    assert [d.name for d in train] == [d.name for d in docs if d not in valid]  # in the corpus order
    again = split_documents(list(reversed(docs)), 0.1, seed=0)  # the split is the same, in the given order
    assert (set(again[0]), set(again[1])) == (set(train), set(valid))
    assert split_documents(docs, 0.1, seed=1)[1] != valid
    assert split_documents(docs, 0.0, seed=0) == (tuple(docs), ())


def test_split_edges() -> None:
    two = [_doc("a", "1"), _doc("b", "2")]
    train, valid = split_documents(two, 0.01, seed=0)
    assert len(train) == len(valid) == 1
    assert len(split_documents(two, 0.99, seed=0)[0]) == 1
    with pytest.raises(CorpusError, match="needs at least 2 documents to split, the corpus has 1"):
        split_documents(two[:1], 0.1, seed=0)


def test_record_files_filters_and_bad_inputs(tmp_path: Path) -> None:
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": f"int v{i};"}) + "\n" for i in range(3)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"content": ["int p;", "", "int q;"]}), tmp_path / "c.parquet")
    (tmp_path / "d.h").write_text("int d;\n")
    (tmp_path / "e.py").write_text("e = 1\n")
    with pytest.raises(CorpusError, match=r"c.parquet: no column 'text' \(columns: content\)"):
        load_corpus([str(tmp_path)])
    sources = [
        SourceConfig(path=str(tmp_path), exclude=[".parquet", ".py"]),
        SourceConfig(path=str(tmp_path / "*.parquet"), text_key="content"),
    ]
    corpus = scan_corpus(sources)
    names = [Path(d.name).name for d in corpus.sources[0].documents]
    assert names == [*(f"a.jsonl.gz:{i}" for i in (1, 2, 3)), *(f"b.jsonl.zst:{i}" for i in (1, 2, 3)), "d.h"]
    assert [Path(d.name).name for d in corpus.sources[1].documents] == ["c.parquet:1", "c.parquet:3"]
    (tmp_path / "d.h").write_bytes(b"\x7fELF\0")  # a binary file among text ones: skipped and counted
    assert scan_corpus(sources).sources[0].skipped == {"binary files": 1}
    assert corpus.sources[1].skipped == {"empty records": 1}
    with pytest.raises(
        CorpusError, match=r"data.sources\[0\] = .*: none of its 5 files is left by include = \['.rs'\]"
    ):
        scan_corpus([SourceConfig(path=str(tmp_path), include=[".rs"])])

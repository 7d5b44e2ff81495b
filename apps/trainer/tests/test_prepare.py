"""The data pipeline end to end on real headers: decoding the packed rows gives the documents
back, structure channels line up with tokens, and the cache is reused, or rebuilt when it is
corrupt or stale, never used half-written."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import slice_config

from nam_embed.cpp import extract_cpp_structure
from nam_trainer.data import PreparedData, load_or_build, prepare_data, units
from nam_trainer.data import prepare as prepare_module


def _names(data: PreparedData, split: str) -> list[str]:
    return (data.entry / f"{split}-0.documents").read_text().splitlines()


def _documents_from_rows(data: PreparedData, split: str) -> dict[int, list[int]]:
    """Token ids per document id, read back through the packed rows (each label once)."""
    ds = data.sources[0].train if split == "train" else data.sources[0].validation
    assert ds is not None
    out: dict[int, list[int]] = {}
    first = ds[0]
    out.setdefault(int(first["document_ids"][0]), []).append(int(first["tokens"][0]))
    for i in range(len(ds)):
        row = ds[i]
        doc_of_label = np.append(row["document_ids"][1:].numpy(), -2)  # label j belongs to input j + 1
        for j in np.flatnonzero(row["loss_mask"].numpy()):
            doc = int(row["document_ids"][j + 1]) if j + 1 < len(row["tokens"]) else None
            if doc is None:  # the last label of a row: its document is the next row's first input
                nxt = ds[i + 1] if i + 1 < len(ds) else None
                doc = (
                    int(nxt["document_ids"][0]) if nxt is not None else int(doc_of_label[j - 1] if j else -1)
                )
            out.setdefault(doc, []).append(int(row["labels"][j]))
    return out


def test_packed_rows_decode_back_to_the_documents(prepared: PreparedData, header_slice: list[Path]) -> None:
    texts = {str(p): p.read_text() for p in header_slice}
    tok = prepared.tokenizer
    for split in ("train", "validation"):
        names = _names(prepared, split)
        docs = _documents_from_rows(prepared, split)
        assert sorted(docs) == list(range(len(names)))
        for doc_id, ids in docs.items():
            assert ids[-1] == tok.eos_id
            assert tok.tokenizer.decode(ids[:-1]) == texts[names[doc_id]]
    assert set(_names(prepared, "train")).isdisjoint(_names(prepared, "validation"))
    assert len(_names(prepared, "train")) + len(_names(prepared, "validation")) == len(texts)


def test_structure_channels_line_up_with_tokens(prepared: PreparedData, header_slice: list[Path]) -> None:
    name = _names(prepared, "train")[0]
    text = Path(name).read_text()
    enc = prepared.tokenizer.tokenizer.encode(text, add_special_tokens=False)
    expected = extract_cpp_structure(text, enc.offsets)
    seq = prepared.sources[0].train.seq_length
    rows = [
        prepared.sources[0].train[r] for r in range((len(enc.ids) + seq - 1) // seq)
    ]  # document 0 starts the stream
    tokens = np.concatenate([r["tokens"].numpy() for r in rows])[: len(enc.ids)]
    assert tokens.tolist() == enc.ids
    assert prepared.channels == ("category", "dependency", "depth", "sibling", "node_type")
    for channel in prepared.channels:
        got = np.concatenate([r["structure"][channel].numpy() for r in rows])[: len(enc.ids)]
        assert got.tolist() == expected[channel].tolist()
    assert len(set(expected["node_type"].tolist())) > 10  # real syntax, not a constant


def _copy_cache(prepared: PreparedData, tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(prepared.entry.parent.parent, root)
    return root


def _run(root: Path, header_slice: list[Path], *extra: str) -> tuple[PreparedData, list[str]]:
    logs: list[str] = []
    cfg = slice_config(root, header_slice, *extra)
    return prepare_data(cfg, logs.append), [line for line in logs if line.startswith("cache:")]


def _bytes(data: PreparedData) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data.entry.iterdir())}


def test_cache_is_reused(prepared: PreparedData, header_slice: list[Path], tmp_path: Path) -> None:
    root = _copy_cache(prepared, tmp_path)
    data, logs = _run(root, header_slice)
    assert [line.split()[1] for line in logs] == ["using", "using"]
    assert data.entry.name == prepared.entry.name and _bytes(data) == _bytes(prepared)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            "flip a byte of train-0.tokens.bin",
            "train-0.tokens.bin does not match its sha256 in the manifest (corrupt)",
        ),
        ("truncate validation-0.structure.idx", "validation-0.structure.idx has"),
        ("delete train-0.loss_mask.bin", "train-0.loss_mask.bin is missing"),
        ("delete manifest.json", "it has no manifest"),
        ("garble manifest.json", "its manifest is unreadable"),
        ("change the manifest's key inputs", "it was built from different inputs (stale)"),
        ("change the manifest's format", "this version writes 2 (stale)"),
    ],
)
def test_corrupt_or_stale_cache_is_rebuilt_not_used(
    prepared: PreparedData, header_slice: list[Path], tmp_path: Path, damage: str, reason: str
) -> None:
    root = _copy_cache(prepared, tmp_path)
    entry = root / "packed" / prepared.entry.name
    if damage.startswith("flip"):
        path = entry / "train-0.tokens.bin"
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage.startswith("truncate"):
        path = entry / "validation-0.structure.idx"
        path.write_bytes(path.read_bytes()[:-8])
    elif damage.startswith("delete"):
        (entry / damage.split()[1]).unlink()
    elif damage.startswith("garble"):
        (entry / "manifest.json").write_text("{")
    else:
        manifest = json.loads((entry / "manifest.json").read_text())
        if "key inputs" in damage:
            manifest["key_inputs"]["seq_length"] = 65
        else:
            manifest["format"] = 0
        (entry / "manifest.json").write_text(json.dumps(manifest))
    data, logs = _run(root, header_slice)
    assert logs[0].split()[1] == "using"  # the tokenizer entry is intact
    assert logs[1].startswith(f"cache: rebuilding {entry}: ") and reason in logs[1]
    assert _bytes(data) == _bytes(prepared)  # rebuilt byte for byte
    left = sorted(p.name for p in (root / "packed").iterdir() if not p.name.endswith(".claim"))
    assert left == [entry.name]  # nothing left aside


def test_changed_corpus_or_settings_build_new_entries(
    prepared: PreparedData, header_slice: list[Path], tmp_path: Path
) -> None:
    root = _copy_cache(prepared, tmp_path)
    files = tmp_path / "files"
    files.mkdir()
    copies = [files / f"{i}_{p.name}" for i, p in enumerate(header_slice)]
    for src, dst in zip(header_slice, copies, strict=True):
        shutil.copy(src, dst)
    first, _ = _run(root, copies)
    validation_doc = Path(_names(first, "validation")[0])
    validation_doc.write_text(validation_doc.read_text() + "\n// edited\n")
    edited, logs = _run(root, copies)  # the BPE sees only the training split: reused; the rows are not
    assert edited.entry != first.entry and [line.split()[1] for line in logs] == ["using", "building"]
    train_doc = Path(_names(first, "train")[0])
    train_doc.write_text(train_doc.read_text() + "\n// edited\n")
    edited, logs = _run(root, copies)
    assert [line.split()[1] for line in logs] == ["building", "building"]
    longer, logs = _run(root, copies, "--model.seq_length", "32")
    assert longer.entry != edited.entry and [line.split()[1] for line in logs] == ["using", "building"]
    assert longer.sources[0].train[0]["tokens"].shape == (32,)


def test_without_structure_no_channels_are_written(
    prepared: PreparedData, header_slice: list[Path], tmp_path: Path
) -> None:
    root = _copy_cache(prepared, tmp_path)
    data, _ = _run(root, header_slice, "--data.structure", "none", "--model.embedding.structure", "false")
    assert data.channels == () and "structure" not in data.sources[0].train[0]
    assert not any("structure" in p.name for p in data.entry.iterdir())
    assert data.sources[0].train[0]["tokens"].tolist() == prepared.sources[0].train[0]["tokens"].tolist()


def test_jsonl_corpus_and_no_validation(tmp_path: Path, header_slice: list[Path]) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in header_slice[:3]))
    logs: list[str] = []
    cfg = slice_config(
        tmp_path / "cache", [f], "--data.validation_fraction", "0", "--model.vocab_size", "300"
    )
    data = prepare_data(cfg, logs.append)
    assert data.sources[0].validation is None and _names(data, "train") == [f"{f}:{i}" for i in (1, 2, 3)]


def test_a_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    def build(out: Path) -> dict[str, object]:
        (out / "part.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        load_or_build(tmp_path, "packed", {"k": 1}, build, log=lambda _: None)
    assert [p.name for p in (tmp_path / "packed").iterdir() if not p.name.endswith(".claim")] == []


_KILLED_BUILDER = """
import sys, time
from pathlib import Path
from nam_trainer.data.cache import load_or_build

def build(out):
    (out / "rows.bin").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(60)
    return {}

load_or_build(Path(sys.argv[1]), "packed", {"k": 1}, build, log=lambda _: None)
"""


def test_a_build_killed_midway_is_never_used(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BUILDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = [p for p in (tmp_path / "packed").iterdir() if not p.name.endswith(".claim")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")  # only the temporary name
    logs: list[str] = []
    entry = load_or_build(
        tmp_path, "packed", {"k": 1}, lambda out: (out / "rows.bin").write_bytes(b"y") and {}, logs.append
    )
    assert logs[-1] == f"cache: building {entry}" and (entry / "rows.bin").read_bytes() == b"y"
    assert logs[0].startswith(f"cache: taking over the build of {entry}: its builder pid {proc.pid} ")
    start = time.monotonic()
    assert load_or_build(tmp_path, "packed", {"k": 1}, lambda out: {}, logs.append) == entry
    assert logs[-1] == f"cache: using {entry}" and time.monotonic() - start < 5


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(out: Path) -> dict[str, object]:
        calls.append(1)
        time.sleep(0.3)
        (out / "rows.bin").write_bytes(b"z")
        return {}

    entries: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: entries.append(load_or_build(tmp_path, "packed", {"k": 2}, build, lambda _: None))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(entries)) == 1 and len(entries) == 3


def _rows(data: PreparedData) -> list[list[int]]:
    return [
        [
            *data.sources[0].train[i]["tokens"].tolist(),
            *data.sources[0].train[i]["structure"]["depth"].tolist(),
        ]
        for i in range(len(data.sources[0].train))
    ]


def test_two_workers_give_the_rows_of_one(
    prepared: PreparedData,
    header_slice: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(units, "UNIT_BYTES", 10_000)  # several units from six headers
    data, _ = _run(tmp_path / "cache", header_slice, "--data.workers", "2")
    assert len(units.plan_units(0, "text", header_documents(header_slice), frozenset(), 0)) >= 3
    assert _rows(data) == _rows(prepared) and _bytes(data) == _bytes(prepared)
    said = capfd.readouterr().err  # the workers' own stderr: megatron and torch speak at their import there
    assert not any(n in said for n in ("Apex", "No CUDA runtime", "Could not determine rank")), said


def test_workers_refuse_a_main_script_read_from_stdin() -> None:
    """Spawned workers import the main script again: from ``python -`` they would die at start and be
    restarted forever; the pool is not started and one line says why."""
    script = (
        "from nam_trainer.data.workers import Workers\nwith Workers(2) as w:\n    list(w.imap(abs, [-1]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert "data.workers = 2: worker processes import the main script again, and '<stdin>' is no file" in (
        done.stderr
    )


def header_documents(files: list[Path]) -> list:
    from nam_trainer.config.schema import SourceConfig
    from nam_trainer.data.corpus import scan_corpus

    return list(scan_corpus([SourceConfig(path=str(files[0].parent))]).documents)


def test_a_preparation_killed_halfway_reuses_finished_units_and_rebuilds(
    prepared: PreparedData, header_slice: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(units, "UNIT_BYTES", 10_000)
    real = units.build_unit
    built: list[int] = []

    def dies_on_third(task: tuple[units.Unit, units.UnitJob]) -> dict:
        if len(built) == 2:  # a half-written unit, as a kill leaves it
            (task[1].work_dir / f".tmp-{task[0].name}-1-x").mkdir()
            raise KeyboardInterrupt
        built.append(task[0].index)
        return real(task)

    monkeypatch.setattr(prepare_module, "build_unit", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cache", header_slice)
    assert not any(p.name.startswith("manifest") for p in (tmp_path / "cache" / "packed").rglob("*"))
    built.clear()
    monkeypatch.setattr(prepare_module, "build_unit", real)
    logs: list[str] = []
    data = prepare_data(slice_config(tmp_path / "cache", header_slice), logs.append)
    assert any(line.startswith("data: reusing 2 of ") for line in logs)
    assert _rows(data) == _rows(prepared) and _bytes(data) == _bytes(prepared)
    assert not any(p.name.startswith(".work-") for p in (tmp_path / "cache" / "packed").iterdir())


def test_units_are_packed_as_they_are_done_not_after_the_last(
    prepared: PreparedData, header_slice: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pack is one process: left until every unit is done, it would be a serial phase growing
    with the corpus. With one worker (a lazy map), each unit's rows are read for packing before the
    next unit is built; the rows are those of a build in one piece."""
    monkeypatch.setattr(units, "UNIT_BYTES", 10_000)
    events: list[tuple[str, int]] = []
    build, read = prepare_module.build_unit, prepare_module.unit_documents

    def building(task: tuple[units.Unit, units.UnitJob]) -> dict:
        events.append(("build", task[0].index))
        return build(task)

    def reading(
        work_dir: Path, unit: units.Unit, split: str, structure: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        events.append(("pack", unit.index))
        return read(work_dir, unit, split, structure)

    monkeypatch.setattr(prepare_module, "build_unit", building)
    monkeypatch.setattr(prepare_module, "unit_documents", reading)
    data, _ = _run(tmp_path / "cache", header_slice)
    built = [i for kind, i in events if kind == "build"]
    assert len(built) >= 3
    first_pack = events.index(("pack", built[0]))
    assert first_pack < events.index(("build", built[1])), events
    assert _rows(data) == _rows(prepared) and _bytes(data) == _bytes(prepared)

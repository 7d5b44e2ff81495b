"""Shared fixtures: a small slice of the machine's real C++ standard library headers, and one
prepared dataset built from it (tokenizer trained, rows packed) that read-only tests share."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nam_trainer.config import load_config
from nam_trainer.config.schema import Config
from nam_trainer.data import PreparedData, cxx_header_dirs, prepare_data

SLICE_FILES = 6


@pytest.fixture(scope="session")
def header_dirs() -> list[Path]:
    return cxx_header_dirs()


@pytest.fixture(scope="session")
def header_slice(header_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A few real headers of 4-16 KB, chosen by sorted path (the same on every run of a machine),
    copied into one directory: one source."""
    files = sorted(
        p for p in header_dirs[0].rglob("*") if p.is_file() and 4_000 <= p.stat().st_size <= 16_000
    )
    assert len(files) >= SLICE_FILES, f"too few headers in {header_dirs[0]}"
    folder = tmp_path_factory.mktemp("headers")
    copies = [folder / f"{i}_{p.name}" for i, p in enumerate(files[:SLICE_FILES])]
    for src, dst in zip(files, copies, strict=False):
        shutil.copy(src, dst)
    return copies


def as_sources(files: list[Path]) -> list[Path]:
    """Files that fill one directory as that directory (one source); others one source each."""
    folders = {p.parent for p in files}
    if len(folders) == 1 and sorted(next(iter(folders)).iterdir()) == sorted(files):
        return list(folders)
    return files


def slice_config(cache_dir: Path, sources: list[Path], *extra: str) -> Config:
    """A small configuration over real files: vocabulary 400, rows of 64 tokens."""
    return load_config(
        "nam56r-tiny",
        overrides=[
            "--data.cache_dir",
            str(cache_dir),
            "--data.sources",
            "[" + ", ".join(f'"{p}"' for p in as_sources(sources)) + "]",
            "--model.vocab_size",
            "400",
            "--model.seq_length",
            "64",
            "--data.validation_fraction",
            "0.25",
            "--data.workers",  # in this process: no pool to start (a test asks for 2 where it matters)
            "1",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, header_slice: list[Path]) -> PreparedData:
    cfg = slice_config(tmp_path_factory.mktemp("cache"), header_slice)
    return prepare_data(cfg, log=lambda _: None)

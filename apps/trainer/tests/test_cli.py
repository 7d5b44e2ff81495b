from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import SLICE_FILES

from nam_trainer.cli import main
from nam_trainer.config import load_config


def _slice_args(cache: Path, files: list[Path]) -> list[str]:
    return [
        "--data.cache_dir",
        str(cache),
        "--data.sources",
        "[" + ", ".join(f'"{p}"' for p in files) + "]",
        "--model.vocab_size=300",
        "--model.seq_length",
        "64",
    ]


def test_dry_run_prints_layout_plan_data_and_a_reusable_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dry-run", "--data.cache_dir", str(tmp_path), "--training.steps", "11", "--world-size", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "preset nam56r-tiny < command-line overrides" in out
    assert "NAM56R: AEMEAEMEAEMR x 52 layers: A 13, M 13, E 22, R 4" in out
    assert "R M2RNN recurrent    at 12, 24, 36, 48" in out
    assert "parallel  world 1 = tensor 1 x pipeline 1 x data 1" in out
    assert "C++ standard library headers in" in out and "tokenizer: to train into" in out
    resolved = out.split("# the resolved configuration (nam-train --config FILE reproduces it)\n", 1)[1]
    assert tomllib.loads(resolved)["training"]["steps"] == 11
    f = tmp_path / "resolved.toml"
    f.write_text(resolved)
    assert load_config("nam56r", [f]) == load_config(overrides=argv[1:5])


def test_dry_run_shows_the_pipeline_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "nam56r", "--dry-run", "--world-size", "4", "--parallel.pipeline", "4"]
    assert main([*argv, "--data.cache_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stages    4 pipeline x 1 virtual:" in out and "chunk 3: rank 3 virtual 0" in out
    assert "hidden 3584, vocab 65536, seq 4096; attention 56 heads / 8 KV (head dim 64)" in out


def test_data_command_builds_then_reuses_the_cache(
    tmp_path: Path, header_slice: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["data", *_slice_args(tmp_path, header_slice[:4])]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "cache: building" in first and "train: 3 documents" in first and "validation: 1 documents" in first
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "cache: building" not in second and second.count("cache: using") == 2
    assert main(["--dry-run", *_slice_args(tmp_path, header_slice[:4])]) == 0
    assert "packed rows: cached in" in capsys.readouterr().out
    assert len(header_slice) == SLICE_FILES


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dry-run", "--modle.hidden_size", "8"], "unknown section [modle] (did you mean 'model'?)"),
        (
            ["--dry-run", "--parallel.tensor", "3"],
            "model.attention.num_heads 4 is not divisible by parallel.tensor 3",
        ),
        (["--dry-run", "--world-size", "3", "--training.global_batch_size", "4"], "is not divisible by"),
        (["--dry-run", "--data.sources", "/nonexistent/corpus"], "no such file or directory"),
        (["--dry-run", "--data.compiler", "no-such-cxx"], "no C++ compiler found"),
    ],
)
def test_bad_inputs_exit_2_with_a_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--data.cache_dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_empty_corpus_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.h").write_text("")
    assert main(["data", "--data.sources", str(tmp_path), "--data.cache_dir", str(tmp_path / "c")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_installed_entry_point() -> None:
    run = subprocess.run(
        [Path(sys.executable).parent / "nam-train", "--help"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0 and "--section.key VALUE" in run.stdout

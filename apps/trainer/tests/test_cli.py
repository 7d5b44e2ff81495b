from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
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
    folder = tmp_path / "four"
    folder.mkdir()
    for p in header_slice[:4]:
        shutil.copy(p, folder)
    argv = ["data", *_slice_args(tmp_path, [folder])]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "cache: building" in first and "validation: 1 documents" in first
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "cache: building" not in second and second.count("cache: using") == 2
    for out in (first, second):  # each source's facts once, built or found in the cache
        assert out.count("data: source 0 train: 3 documents") == 1
    assert main(["--dry-run", *_slice_args(tmp_path, [folder])]) == 0
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
        (
            ["--dry-run", "--data.sources", '[{path = "a", weight = 0}]'],
            "data.sources[0].weight = 0.0: must be a finite number > 0",
        ),
        (
            ["--dry-run", "--data.sources", '["a", {path = "b", weight = -1}]'],
            "data.sources[1].weight = -1.0: must be a finite number > 0",
        ),
        (["--dry-run", "--data.compiler", "no-such-cxx"], "no C++ compiler found"),
        (["--dry-run", "--world-size", "0"], "world size 0: needs at least 1 process"),
        (
            ["--dry-run", "--model.mtp_depth", "100000"],
            "model.mtp_depth 100000 must be an integer from 0 (off) to model.seq_length - 1",
        ),
        (["--dry-run", "--world-size", "x"], "argument --world-size: invalid int value: 'x'"),
    ],
)
def test_bad_inputs_exit_2_with_a_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main([*argv, "--data.cache_dir", str(tmp_path)])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and "usage:" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA lacks")
def test_a_configuration_this_machine_cannot_train_exits_2_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graphed = ["--model.cuda_graphs", "MRE", "--model.moe.dispatcher", "local"]
    run = ["--data.cache_dir", str(tmp_path / "cache"), "--checkpoint.dir", str(tmp_path / "run")]
    assert main([*graphed, *run]) == 2
    err = capsys.readouterr().err
    assert "cannot train this configuration:\n  - model.cuda_graphs = 'MRE' needs a CUDA device" in err
    assert "Traceback" not in err
    assert not any((tmp_path / "cache").rglob("*.bin")) and not (tmp_path / "run" / "checkpoints").exists()
    assert main(["--dry-run", *graphed, *run]) == 0  # a GPU run is planned on any machine


def test_empty_corpus_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.h").write_text("")
    assert main(["data", "--data.sources", str(tmp_path), "--data.cache_dir", str(tmp_path / "c")]) == 2
    assert "no usable text" in capsys.readouterr().err


def test_installed_entry_point() -> None:
    run = subprocess.run(
        [Path(sys.executable).parent / "nam-train", "--help"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0 and "--section.key VALUE" in run.stdout


def test_a_hidden_size_the_heads_do_not_divide_is_refused_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to send the user round in a circle through kv_channels; the config has none now."""
    assert main(["--dry-run", "--model.hidden_size", "130", "--data.cache_dir", str(tmp_path / "c")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and not (tmp_path / "c").exists()  # nothing printed, nothing prepared
    named = [line for line in err.splitlines() if "num_heads" in line]
    assert named == [
        "  - model.hidden_size 130 is not divisible by model.attention.num_heads 4 "
        "(the head dim is hidden_size / num_heads and must be whole)"
    ]


def _never(*_: object, **__: object) -> None:
    raise AssertionError("reached: the directory should have been refused before")


@pytest.mark.parametrize(
    ("command", "key"), [("train", "checkpoint.dir"), ("train", "data.cache_dir"), ("data", "data.cache_dir")]
)
def test_an_unusable_directory_exits_2_before_any_work(
    command: str,
    key: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nam_trainer.train.loop

    monkeypatch.setattr(nam_trainer.train.loop, "train", _never)  # no data, no processes, no model
    monkeypatch.setattr("nam_trainer.cli.prepare_data", _never)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    dirs = {
        "checkpoint.dir": str(tmp_path / "run"),
        "data.cache_dir": str(tmp_path / "cache"),
        key: str(a_file),
    }
    argv = [command, *(a for k, v in dirs.items() for a in (f"--{k}", v))]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"nam-train: {key} = '{a_file}' is a file, not a directory; give a directory (it is created when missing)\n"
    )
    assert main([command, f"--{key}", str(a_file / "below")]) == 2
    assert f"{key} = '{a_file / 'below'}': cannot create it (Not a directory)" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_directory_without_write_permission_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["data", "--data.cache_dir", str(locked)]) == 2
    assert "cannot write in it (Permission denied)" in capsys.readouterr().err


def test_ctrl_c_before_training_is_one_line_and_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("nam_trainer.cli.prepare_data", interrupted)
    assert main(["data", "--data.cache_dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("nam-train: interrupted before training began")


def test_sigint_during_data_preparation_exits_130_with_one_line(
    tmp_path: Path, header_dirs: list[Path]
) -> None:
    """A real Ctrl-C while the tokenizer trains on the machine's whole header directory."""
    argv = [sys.executable, "-m", "nam_trainer", "data", "--data.cache_dir", str(tmp_path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [*argv, "--data.sources", str(header_dirs[0])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("corpus:")  # read; building next
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (
        proc.returncode == 130 and err.startswith("nam-train: interrupted") and len(err.splitlines()) == 1
    ), err
    assert not list((tmp_path / "tokenizer").glob("[!.]*"))  # no entry, only a temporary directory at most


def test_report_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["report"])
    assert done.value.code == 2
    assert capsys.readouterr().err == (
        "nam-train report: the following arguments are required: run_dir (see nam-train report --help)\n"
    )


def test_help_lists_the_commands_and_where_the_keys_are_documented(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "nam-train data" in out and "nam-train report RUN_DIR" in out
    assert "nam_spec/config.py" in out and "config/schema.py" in out and "apps/trainer/README.md" in out
    assert "130" in out and "141" in out  # the exit codes


def test_a_closed_stdout_ends_quietly_with_141(tmp_path: Path) -> None:
    """``nam-train --dry-run | head -1``: the reader is gone before the report is printed."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nam_trainer", "--dry-run", "--data.cache_dir", str(tmp_path)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"},
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")  # and no TE/Apex notices from the dry run


def test_a_huge_family_depth_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.toml"
    path.write_text(f'[family.BIG]\npattern = "AEM"\ndepth = {10**11}\ncounts = {{A = 1}}\n')
    argv = ["--dry-run", "--model.family", "BIG", "--model.families_file", str(path)]
    assert main([*argv, "--data.cache_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "depth must be between 1 and 1,000,000 layers" in err


def test_mla_dimensions_tensor_parallelism_cannot_split_exit_2_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dry-run", "--model.family", "NAM56R-MLA", "--model.attention.q_lora_rank", "31"]
    argv += ["--parallel.tensor", "2", "--world-size", "2", "--data.cache_dir", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "  - model.attention.q_lora_rank 31 is not divisible by parallel.tensor 2 " in err, err
    assert "Traceback" not in err

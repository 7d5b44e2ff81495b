"""The model facts of ``nam-train --dry-run``: nam-spec's layer table, parameters, FLOPs and memory,
for the tiny preset and the full NAM56R (which must not be allocated to be described)."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest

from nam_trainer.cli import main

NUMBER = r"([\d,]+)"


def _dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["--dry-run", "--data.cache_dir", str(tmp_path), *argv]) == 0
    return capsys.readouterr().out


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _params(out: str) -> tuple[int, int, int, int]:
    """(total, total without the embedding extras, extras, active) from the params line."""
    m = re.search(
        rf"^params    total {NUMBER} = {NUMBER} \+ embedding extras {NUMBER}; active per token {NUMBER}",
        out,
        re.M,
    )
    assert m, out
    total, formula, extras, active = map(_int, m.groups())
    return total, formula, extras, active


def _peak_gib(out: str) -> float:
    m = re.search(
        r"^memory    ([\d.]+) GiB peak per GPU \(micro-batch (\d+) x seq (\d+), (\w+), data parallel (\d+)",
        out,
        re.M,
    )
    assert m, out
    return float(m.group(1))


def test_tiny_preset_reports_table_parameters_flops_and_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from nam_embed import NgramHashEmbedding, StructureEmbedding
    from nam_trainer.config import load_config

    out = _dry_run(tmp_path, capsys, "--training.micro_batch_size", "2")
    rows = re.findall(r"^ {12}\s*(\d+)  ([AEMR-])\s+\S+", out, re.M)
    assert [int(n) for n, _ in rows] == list(range(1, 53))
    assert "".join(k for _, k in rows) == ("AEMEAEMEAEMR" * 5)[:52]
    total, formula, extras, active = _params(out)
    assert total == formula + extras and formula < total and active < total

    # nam-spec's count of the extras equals the real (tiny) modules' count
    model = load_config("nam56r-tiny").model
    built = [
        NgramHashEmbedding(model.embedding.ngram_config(), model.hidden_size),
        StructureEmbedding(model.embedding.structure_config(), model.hidden_size),
    ]
    assert extras == sum(p.numel() for m in built for p in m.parameters()) > 0

    assert re.search(r"^flops     [\d.e+]+ model FLOPs per token forward\+backward", out, re.M)
    expected_precision = "bfloat16" if torch.cuda.is_available() else "float32"
    assert f"micro-batch 2 x seq 256, {expected_precision}, data parallel 1" in out
    assert 0.1 < _peak_gib(out) < 5
    for row in ("weights", "grads", "optimizer state", "activations E", "output + loss", "allowance"):
        assert re.search(rf"^ {{12}}{re.escape(row)}\s+[\d.]+$", out, re.M), row


def test_full_nam56r_is_described_without_allocating_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """5.7 B parameters would be 11 GB even in bf16: the dry run must count them, not build them."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = _dry_run(tmp_path, capsys, "--preset", "nam56r", "--world-size", "8")
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20
    assert grown_gib < 2
    total, formula, extras, active = _params(out)
    assert formula == 5_574_492_448  # DESIGN.md's NAM56R through nam-spec's formula
    assert 100e6 < extras < 200e6 and total == formula + extras
    assert 0.5 < active / total < 0.6  # 12 of 16 experts idle per token
    flops = float(re.search(r"^flops     ([\d.e+]+) model FLOPs per token", out, re.M).group(1))
    assert flops == pytest.approx(1.792e10, rel=1e-3)
    # data parallel 8 with the distributed optimizer: fp32 main params and Adam state split eight ways
    assert "bfloat16, data parallel 8, distributed optimizer on" in out
    peak = _peak_gib(out)
    assert 40 < peak < 80
    one_gpu = _peak_gib(_dry_run(tmp_path, capsys, "--preset", "nam56r", "--world-size", "1"))
    assert one_gpu > peak + 40


def test_every_pipeline_rank_is_estimated_and_the_most_loaded_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--preset", "nam56r", "--world-size", "8", "--parallel.pipeline", "4"]
    out = _dry_run(tmp_path, capsys, *argv)
    assert _params(out)[1] == 5_574_492_448
    stages = re.findall(r"^ {12}pipeline rank (\d) \(global ranks (\d)-(\d)\)\s+([\d.]+) GiB", out, re.M)
    assert [(int(r), int(a), int(b)) for r, a, b, _ in stages] == [(r, 2 * r, 2 * r + 1) for r in range(4)]
    peaks = [float(gib) for *_, gib in stages]
    most = peaks.index(max(peaks))
    assert f"on the most loaded rank: pipeline rank {most} (global ranks {2 * most}-{2 * most + 1})" in out
    assert _peak_gib(out) == pytest.approx(max(peaks), abs=0.06)
    assert "128 micro-batches a step" in out  # global batch 256 over micro-batch 1 x data 2

    assert main(["--dry-run", "--data.cache_dir", str(tmp_path), *argv, "--gpu-memory-gib", "141"]) == 0
    assert re.search(r"^ {10}fits a 141 GiB GPU \([\d.]+ GiB to spare\)$", capsys.readouterr().out, re.M)
    assert main(["--dry-run", "--data.cache_dir", str(tmp_path), *argv, "--gpu-memory-gib", "10"]) == 5
    assert f"does not fit a 10 GiB GPU: pipeline rank {most} (global ranks" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            [
                "--world-size",
                "2",
                "--parallel.pipeline",
                "2",
                "--parallel.virtual_pipeline",
                "2",
                "--training.global_batch_size",
                "12",
            ],
            "the interleaved schedule runs micro-batches in groups of parallel.pipeline = 2",
        ),
        (["--gpu-memory-gib", "0"], "argument --gpu-memory-gib: '0' is not a positive number of GiB"),
    ],
)
def test_combinations_the_estimate_refuses_exit_2_before_any_output(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["--dry-run", "--data.cache_dir", str(tmp_path), *argv])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    # one line: the usage error, or the configuration's single problem under its heading
    assert code == 2 and out == "" and message in err and len(err.splitlines()) <= 2, err


def test_gpu_memory_gib_needs_the_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--gpu-memory-gib", "80", "--data.cache_dir", str(tmp_path)])
    assert exit_.value.code == 2 and "--gpu-memory-gib needs --dry-run" in capsys.readouterr().err

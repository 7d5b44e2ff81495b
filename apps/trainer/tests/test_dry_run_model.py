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


def test_pipeline_parallel_memory_is_not_guessed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _dry_run(tmp_path, capsys, "--preset", "nam56r", "--world-size", "4", "--parallel.pipeline", "4")
    assert re.search(r"^memory    not estimated: .*parallel.pipeline 4", out, re.M)
    assert _params(out)[1] == 5_574_492_448

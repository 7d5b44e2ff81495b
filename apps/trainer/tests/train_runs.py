"""Helpers for the training tests: the command line of a short tiny-preset run over the shared
header slice, its metrics, and the rank function of the two-process run (module level: ranks
import it by name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import as_sources

STEPS = 10


def train_args(cache: Path, sources: list[Path], run_dir: Path, *extra: str) -> list[str]:
    """nam56r-tiny (52 layers, hidden 128) on rows of 64 tokens, 2 x 2 rows per step."""
    return [
        *("--data.cache_dir", str(cache)),
        *("--data.sources", "[" + ", ".join(f'"{p}"' for p in as_sources(sources)) + "]"),
        *("--model.vocab_size", "400", "--model.seq_length", "64", "--data.validation_fraction", "0.25"),
        *("--training.steps", str(STEPS), "--training.warmup_steps", "1"),
        *("--training.micro_batch_size", "2", "--training.global_batch_size", "4"),
        *("--training.eval_interval", "5", "--training.eval_iters", "2"),
        *("--checkpoint.dir", str(run_dir), "--checkpoint.interval", "5"),
        *extra,
    ]


def records(run_dir: Path, split: str) -> dict[int, dict[str, Any]]:
    """step -> the run's record of that split (the last one of a step logged twice)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["split"] == split:
            out[r["step"]] = r
    return out


def losses(run_dir: Path, split: str = "train") -> dict[int, float | None]:
    return {step: r["loss"] for step, r in records(run_dir, split).items()}


def train_rank(argv: list[str]) -> int:
    from nam_trainer.cli import main

    return main(argv)

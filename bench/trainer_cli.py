"""`nam-train` itself against bench/trainer.py's step: does the trainer reach the bench's TFLOP/s?

    NAM_COMMIT=<sha> bash bench/gpu.sh trainer_cli

Issue "Throughput" asks that ``nam-train --preset nam56r-small`` on the GPU reach the bench's model
TFLOP/s within TOLERANCE. Two runs at the same settings (bench/trainer.py's OVERRIDES against the
preset: bf16, no recomputation, no warm-up; micro-batch 1, MICROBATCHES micro-batches per step):

- ``nam-train``: ``python -m nam_trainer --preset nam56r-small`` on the default corpus (the
  machine's C++ standard library headers, tokenizer and rows prepared by the run itself into a
  fresh cache), evaluation and checkpoints pushed beyond the run, document masking as given by
  MASKING (off: the bench's batches have no boundaries; bench/trainer_documents.py prices them).
  Its per-step records (metrics.jsonl: ``tflops``, ``tokens_per_s``, ``peak_memory_gib``) are read
  as they are written; once STEPS steps are recorded the run is killed (SIGKILL: its final
  checkpoint, ~28 GB, is not what is measured).
- the bench: bench/trainer.py's ``ours_case`` at micro-batch 1, random tokens, in a fresh process.

Rows: medians over the steps after WARMUP_STEPS (nam-train's first steps include Triton's
compilation): nam-train's model TFLOP/s as it records them (its step alone) and over the wall
between its records (batch assembly, metrics and logging included: what a user gets), the bench's,
and nam-train's wall rate / the bench's; check: |ratio - 1| <= TOLERANCE.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import Report
from bench.trainer import MICRO_BATCH, MICROBATCHES, OVERRIDES, PRESET, cli_args, log, ours_case, preset
from bench.world import in_fresh_process

STEPS = 8
WARMUP_STEPS = 3
TOLERANCE = 0.05
MASKING = "false"
DEADLINE_S = 420  # data preparation (~1 min on 16 cores), build, compilation and STEPS steps


def nam_train_args(run_dir: Path, cache_dir: Path) -> list[str]:
    """nam-train's command line for the run (bench/trainer.py's settings, nothing evaluated or saved)."""
    never = str(10**6)
    return [
        sys.executable,
        "-m",
        "nam_trainer",
        "--preset",
        PRESET,
        *cli_args(
            {
                **OVERRIDES,
                "training.micro_batch_size": str(MICRO_BATCH),
                "training.global_batch_size": str(MICRO_BATCH * MICROBATCHES),
                "training.eval_interval": never,
                "checkpoint.interval": never,
                "checkpoint.dir": str(run_dir),
                "data.cache_dir": str(cache_dir),
                "data.document_masking": MASKING,
            }
        ),
    ]


def train_records(
    run_dir: Path, steps: int, proc: subprocess.Popen, deadline_s: float
) -> list[dict[str, Any]]:
    """The run's first ``steps`` train records, read from metrics.jsonl while it runs."""
    from nam_trainer.metrics.records import MetricsError, read_records

    start = time.monotonic()
    records: list[dict[str, Any]] = []
    while len(records) < steps:
        if proc.poll() is not None:
            raise RuntimeError(f"nam-train exited with {proc.returncode} after {len(records)} steps")
        if time.monotonic() - start > deadline_s:
            raise TimeoutError(f"nam-train recorded {len(records)} of {steps} steps in {deadline_s} s")
        time.sleep(2)
        try:
            records = [r for r in read_records(run_dir / "metrics.jsonl") if r["split"] == "train"]
        except MetricsError:  # not written yet
            continue
    return records[:steps]


def main(report: Report) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, cache_dir = Path(tmp) / "run", Path(tmp) / "cache"
        argv = nam_train_args(run_dir, cache_dir)
        log("nam-train: " + " ".join(argv[1:]))
        proc = subprocess.Popen(argv, env=os.environ.copy())
        try:
            records = train_records(run_dir, STEPS, proc, DEADLINE_S)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
    tokens = MICRO_BATCH * MICROBATCHES * preset().config.model.seq_length
    step_tflops, wall_tflops = [], []
    for before, record in zip(records[WARMUP_STEPS - 1 :], records[WARMUP_STEPS:], strict=False):
        # the record's rate times its step over the wall between records: data, logging included
        wall = record["time"] - before["time"]
        step_tflops.append(record["tflops"])
        wall_tflops.append(record["tflops"] * tokens / record["tokens_per_s"] / wall)
    cli = {"step": statistics.median(step_tflops), "wall": statistics.median(wall_tflops)}
    report.row(
        f"nam-train {PRESET} step {MICROBATCHES}x{MICRO_BATCH}, masking {MASKING}",
        peak_gib=max(r["peak_memory_gib"] for r in records),
        model_tflops_step=cli["step"],
        model_tflops_wall=cli["wall"],
        steps=len(step_tflops),
    )
    log(
        f"nam-train: {cli['step']:.1f} model TFLOP/s in its steps, {cli['wall']:.1f} over the wall between "
        f"steps (medians of steps {WARMUP_STEPS + 1}-{STEPS})"
    )

    bench = in_fresh_process(report, ours_case, MICRO_BATCH, {}, False)
    if bench is None:
        raise RuntimeError("the bench's step failed (its traceback is in the table)")
    ratio = cli["wall"] / bench["model TFLOP/s"]
    report.row(
        f"nam-train (wall) / bench model TFLOP/s (goal within {TOLERANCE:.0%})",
        ratio=ratio,
        step_ratio=cli["step"] / bench["model TFLOP/s"],
    )
    report.check("nam-train (wall) vs bench model TFLOP/s: |ratio - 1|", abs(ratio - 1), TOLERANCE)
    log(
        f"nam-train (wall) / bench = {ratio:.3f} ({cli['wall']:.1f} / {bench['model TFLOP/s']:.1f} model TFLOP/s)"
    )

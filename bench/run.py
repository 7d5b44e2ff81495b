"""One entry point for the GPU machine: install the carried wheels, run registered benchmarks,
print one table last and write JSON.

    bash bench/gpu.sh [NAME ...]                 # on the GPU machine (installs wheels, then this)
    python bench/run.py --list
    python bench/run.py m2rnn mamba --json $OUT/bench.json

A benchmark is a module `bench/<name>.py` with `def main(report: Report) -> None`, listed in
REGISTRY below. It checks correctness against its reference first (report.check) and then
times (report.time). A failed check is reported and makes the run exit 1, but the other
benchmarks still run.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import Report

# name -> module under bench/ ; each issue registers its own.
REGISTRY: dict[str, str] = {
    "attention_documents": "bench.attention_documents",
    "ceilings": "bench.ceilings",
    "cppmega": "bench.cppmega",
    "cross_entropy": "bench.cross_entropy",
    "embed": "bench.embed",
    "generate": "bench.generate",
    "host_ops": "bench.host_ops",
    "layer_graphs": "bench.layer_graphs",
    "prepare": "bench.prepare",
    "mamba": "bench.mamba",
    "mamba3": "bench.mamba3",
    "mla": "bench.mla",
    "moe_ops": "bench.moe_ops",
    "moe_dispatch": "bench.moe_dispatch",
    "m2rnn": "bench.m2rnn",
    "plasticity": "bench.plasticity",
    "spec": "bench.spec",
    "trainer": "bench.trainer",
    "trainer_cli": "bench.trainer_cli",
    "trainer_documents": "bench.trainer_documents",
}


def _commit() -> str:
    """The commit under test: NAM_COMMIT where the tree travelled without .git, else git's."""
    if os.environ.get("NAM_COMMIT"):
        return os.environ["NAM_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {sorted(REGISTRY)})")
    parser.add_argument("--list", action="store_true", help="list registered benchmarks and exit")
    parser.add_argument("--json", type=Path, help="write all rows and checks here")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(REGISTRY)))
        return 0
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; registered: {sorted(REGISTRY)}")

    # A run cut off by `timeout` (SIGTERM) shows where every thread was.
    faulthandler.register(signal.SIGTERM, chain=True)
    report = Report(commit=_commit())
    for name in args.names or list(REGISTRY):
        report.begin(name)
        try:
            importlib.import_module(REGISTRY[name]).main(report)
        except Exception:  # one broken benchmark must not hide the others' numbers
            report.fail(name, traceback.format_exc())
        # After each benchmark, so a run cut off later keeps the numbers already measured.
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report.as_dict(), indent=2))
        print(report.table(name), flush=True)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

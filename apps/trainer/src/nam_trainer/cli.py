"""``nam-train``: the command line.

    nam-train [--preset NAME] [--config FILE ...] [--section.key VALUE ...]   # train (or resume)
    nam-train [same options] --dry-run # what would be built, without building it
    nam-train data [same options]      # build or verify the tokenizer and packed-data cache
    nam-train report RUN_DIR           # PNG plots of RUN_DIR/metrics.jsonl into RUN_DIR/report

Options are layered: preset < config files (in order) < ``--section.key`` overrides. Under
torchrun (``torchrun ... -m nam_trainer``) every process runs the same command.
Exit codes: 0 success (also after a SIGTERM/SIGINT stop with its checkpoint), 2 invalid
configuration or input (the message says what and where), 3 stopped by repeated non-finite losses,
4 no disk space for a checkpoint (the last good one is intact; free space and rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from nam_trainer.config import DEFAULT_PRESET, PRESETS, ConfigError, check, load_config
from nam_trainer.data import CorpusError, TokenizerError, ToolchainError, prepare_data
from nam_trainer.dry_run import report
from nam_trainer.metrics import MetricsError

EXIT_INVALID = 2
EXIT_NO_SPACE = 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nam-train",
        description="Train NAM hybrid models on megatron-core. Any config key can be set as --section.key VALUE.",
    )
    p.add_argument("command", nargs="?", choices=("train", "data"), default="train")
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=PRESETS,
        help=f"base configuration (default {DEFAULT_PRESET})",
    )
    p.add_argument(
        "--config", action="append", default=[], metavar="TOML", help="config file layered over the preset"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the layout, parallel plan and data plan, then stop"
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "1")),
        help="number of processes to plan for (default: $WORLD_SIZE from torchrun, else 1)",
    )
    return p


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argparse options, ``--section.key VALUE`` overrides): a dotted long option is an override."""
    options: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            take = 1 if "=" in arg else 2
            overrides.extend(argv[i : i + take])
            i += take
        else:
            options.append(arg)
            i += 1
    return options, overrides


def _report(argv: list[str]) -> int:
    """``nam-train report RUN_DIR``: no configuration, just the run's metrics file."""
    p = argparse.ArgumentParser(prog="nam-train report", description="Plot a run's metrics.jsonl as PNGs.")
    p.add_argument("run_dir", type=Path, help="the run directory holding metrics.jsonl")
    args = p.parse_args(argv)
    from nam_trainer.metrics.report import write_report  # matplotlib loads only for reports

    try:
        paths = write_report(args.run_dir)
    except MetricsError as err:
        print(f"nam-train report: {err}", file=sys.stderr)
        return EXIT_INVALID
    for path in paths:
        print(path)
    return 0


def _quiet_library_warnings() -> None:
    """megatron-core warns at import about optional packages (Apex, Transformer Engine) it falls
    back from, and torch about CPU-only paths it takes; on a training console that is noise."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint")
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["report"]:
        return _report(arguments[1:])
    options, overrides = _split_overrides(arguments)
    args = _parser().parse_args(options)
    try:
        config = load_config(args.preset, args.config, overrides)
        checked = check(config, args.world_size)
        if args.command == "data":
            data = prepare_data(config)
            for split in ("train", "validation"):
                if split in data.info:
                    facts = data.info[split]
                    print(
                        f"{split}: {len(facts['documents'])} documents, {facts['tokens']:,} tokens, {facts['rows']} rows"
                    )
            print(f"cache: {data.entry}")
            return 0
        if args.dry_run:
            layers = [f"preset {args.preset}", *(f"config {c}" for c in args.config)]
            report(checked, " < ".join(layers + (["command-line overrides"] if overrides else [])))
            return 0
        _quiet_library_warnings()
        from nam_trainer.train.checkpoint import CheckpointError, DiskFull
        from nam_trainer.train.loop import train

        try:
            return train(checked)
        except DiskFull as err:
            print(f"nam-train: {err}", file=sys.stderr)
            return EXIT_NO_SPACE
        except CheckpointError as err:
            print(f"nam-train: {err}", file=sys.stderr)
            return EXIT_INVALID
    except (ConfigError, CorpusError, TokenizerError, ToolchainError) as err:
        print(f"nam-train: {err}", file=sys.stderr)
        return EXIT_INVALID

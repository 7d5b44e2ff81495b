"""``nam-train``: train NAM hybrid models on megatron-core.

commands:
  nam-train [--preset NAME] [--config FILE ...] [--section.key VALUE ...]   train (or resume)
  nam-train [same options] --dry-run [--gpu-memory-gib G]
                                       what would be built, without building or writing anything,
                                       with every pipeline rank's memory estimate (and whether the
                                       most loaded rank fits a G GiB GPU)
  nam-train data [same options]        build or verify the tokenizer and packed-data cache
  nam-train report RUN_DIR             PNG plots of RUN_DIR/metrics.jsonl into RUN_DIR/report
  nam-train eval --checkpoint DIR [--data.KEY VALUE ...]   loss, perplexity, bits per byte
  nam-train generate --checkpoint DIR [--prompt TEXT]      sample text (see `nam-train generate -h`)

Options are layered: preset < config files (in order) < --section.key VALUE overrides. Under
torchrun (torchrun ... -m nam_trainer) every process runs the same command.

config keys (sections model, tokenizer, data, training, parallel, checkpoint, plasticity):
  [model] is nam-spec's ModelConfig (packages/nam-spec/src/nam_spec/config.py), [parallel] its
  ParallelConfig; the other sections are in apps/trainer/src/nam_trainer/config/schema.py; the
  trainer's README (apps/trainer/README.md, "Configuration") explains them all. --dry-run prints
  the resolved configuration as TOML.

exit codes:
  0    done, or stopped by SIGTERM/SIGINT during training with its checkpoint written
  1    an unexpected failure (a bug, or the machine: the traceback says where)
  2    invalid configuration or input, with one message saying what and where: unknown keys or
       values, parallel sizes that do not fit, a corpus that is missing or empty, a data.cache_dir
       or checkpoint.dir that cannot be used, a run directory in use by another run, a checkpoint
       of another layout, geometry, tokenizer or data (checkpoint.allow_new_data lets new data
       through), every checkpoint damaged (a damaged newest one falls back to the previous good
       one), a bad command line
  3    stopped by training.max_consecutive_skips non-finite losses in a row
  4    no disk space for a checkpoint (the last good one is intact; free space and rerun to resume)
  5    --dry-run --gpu-memory-gib G: the most loaded rank's memory estimate does not fit G GiB
  130  interrupted (Ctrl-C) before training began: data preparation, process set-up, model build
  141  stdout closed early (nam-train --dry-run | head)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from nam_layout.shell import guarded
from nam_runtime.quiet import quiet
from nam_trainer.config import DEFAULT_PRESET, PRESETS, ConfigError, check, load_config
from nam_trainer.data import CorpusError, TokenizerError, ToolchainError, prepare_data
from nam_trainer.dry_run import report
from nam_trainer.metrics import MetricsError
from nam_trainer.paths import usable_dir

EXIT_INVALID = 2
EXIT_NO_SPACE = 4
EXIT_NO_FIT = 5
INTERRUPTED = (
    "interrupted before training began; nothing half-built is kept (the data cache holds only "
    "complete entries, the run directory only complete checkpoints)"
)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line with exit code 2, like every other invalid input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INVALID, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nam-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "command",
        nargs="?",
        choices=("train", "data"),
        default="train",
        help="train (the default) or data; `nam-train report RUN_DIR` plots a run",
    )
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
        "--gpu-memory-gib",
        type=_positive_gib,
        metavar="G",
        help="with --dry-run: say whether the most loaded rank fits a GPU of G GiB (exit 5 if not)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=os.environ.get("WORLD_SIZE", "1"),  # a string default goes through type= too
        help="number of processes to plan for (default: $WORLD_SIZE from torchrun, else 1)",
    )
    return p


def _positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of GiB")
    return value


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
    p = _Parser(prog="nam-train report", description="Plot a run's metrics.jsonl as PNGs.")
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


def main(argv: Sequence[str] | None = None) -> int:
    """The exit code of ``nam-train ARGV`` (the module docstring lists them)."""
    quiet()  # before megatron is imported (by the dry run, data structure or training): it speaks at import
    return guarded("nam-train", lambda: _main(argv), INTERRUPTED)


def _main(argv: Sequence[str] | None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["report"]:
        return _report(arguments[1:])
    if arguments[:1] in (["eval"], ["generate"]):
        from nam_trainer.use.commands import parser, run_eval, run_generate

        options, overrides = _split_overrides(arguments[1:])
        args = parser(arguments[0], _Parser).parse_args(options)
        try:
            return (run_eval if arguments[0] == "eval" else run_generate)(args, overrides)
        except ConfigError as err:
            print(f"nam-train {arguments[0]}: {err}", file=sys.stderr)
            return EXIT_INVALID
    options, overrides = _split_overrides(arguments)
    parser = _parser()
    args = parser.parse_args(options)
    if args.gpu_memory_gib is not None and not args.dry_run:
        parser.error("--gpu-memory-gib needs --dry-run (it checks the memory estimate, not a live run)")
    try:
        config = load_config(args.preset, args.config, overrides)
        checked = check(config, args.world_size)
        if args.command == "data":
            usable_dir(config.data.cache_dir, "data.cache_dir")
            print(f"cache: {prepare_data(config).entry}")
            return 0
        if args.dry_run:
            layers = [f"preset {args.preset}", *(f"config {c}" for c in args.config)]
            sources = " < ".join(layers + (["command-line overrides"] if overrides else []))
            return 0 if report(checked, sources, args.gpu_memory_gib) else EXIT_NO_FIT
        usable_dir(config.data.cache_dir, "data.cache_dir")
        usable_dir(config.checkpoint.dir, "checkpoint.dir")
        from nam_spec import environment_problems

        if lacking := environment_problems(config.model):  # --dry-run plans GPU runs anywhere
            raise ConfigError("this machine cannot train this configuration:\n  - " + "\n  - ".join(lacking))
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

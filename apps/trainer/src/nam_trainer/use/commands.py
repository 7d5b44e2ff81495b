"""The ``nam-train eval`` and ``nam-train generate`` command lines (cli.py dispatches to them)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from nam_trainer.data import CorpusError, TokenizerError, ToolchainError, prepare_data
from nam_trainer.train.checkpoint import CheckpointError

EXIT_INVALID = 2
SPLITS = ("validation", "train", "all")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    """Score the checkpoint on the rows of ``args.split``; the default split is the held-out one of
    the checkpoint's own data, and every row ("all") when --data.* options name other data."""
    import torch.distributed as torch_dist

    from nam_trainer.use.evaluate import format_report, report, score_rows
    from nam_trainer.use.loader import load

    try:
        loaded = load(args.checkpoint, overrides)
        cfg = loaded.config
        cfg = dataclasses.replace(
            cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(loaded.tokenizer.path))
        )
        rank0 = torch_dist.get_rank() == 0
        data = prepare_data(cfg, log=_stderr if rank0 else lambda _m: None)
    except (CheckpointError, CorpusError, TokenizerError, ToolchainError) as err:
        _stderr(f"nam-train eval: {err}")
        return EXIT_INVALID
    split = args.split or ("all" if any(o.startswith("--data.") for o in overrides) else "validation")
    chosen = ("train", "validation") if split == "all" else (split,)
    parts, origins = [], {}
    for source in data.sources:
        for name in chosen:
            packed = getattr(source, name)
            if packed is None:
                continue
            docs = packed.document_names()
            parts.append(score_rows(loaded, packed, list(range(len(packed))), len(docs)))
            origins.update(dict.fromkeys(docs, source.origin))
    if not parts:
        _stderr(
            f"nam-train eval: the data has no {split} split (data.validation_fraction = 0?); use --split train"
        )
        return EXIT_INVALID
    import numpy as np

    names = list(origins)  # documents in scoring order: a file belongs to one source and one split
    result = report(np.concatenate(parts), names, origins.__getitem__)
    result.update(checkpoint=str(loaded.path), step=loaded.step, split=split)
    if rank0:
        print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0


def run_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from nam_trainer.use.generate import PromptError, Sampling, generate
    from nam_trainer.use.loader import load

    prompts = list(args.prompt)
    try:
        prompts += [Path(p).read_text() for p in args.prompt_file]
    except OSError as err:
        _stderr(f"nam-train generate: --prompt-file {err.filename}: cannot read it ({err.strerror})")
        return EXIT_INVALID
    if not prompts:
        prompts = [sys.stdin.read()]
    sampling = Sampling(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop)
    )
    try:
        loaded = load(args.checkpoint, overrides)
        one = len(prompts) == 1
        if one:
            sys.stdout.write(prompts[0])
        stream = (
            (lambda _row, text: (sys.stdout.write(text), sys.stdout.flush())) if one else (lambda *_: None)
        )
        out = generate(loaded, prompts, sampling, stream)
    except (CheckpointError, PromptError) as err:
        _stderr(f"nam-train generate: {err}")
        return EXIT_INVALID
    if one:
        print()
    else:
        for i, (prompt, text) in enumerate(zip(prompts, out.texts, strict=True)):
            print(f"=== prompt {i + 1} ===\n{prompt}{text}")
    _stderr(
        f"{out.new_tokens} new tokens in {out.seconds:.2f} s ({out.new_tokens / max(out.seconds, 1e-9):.1f} tokens/s; "
        f"structure extractor {out.structure_s:.2f} s) from {loaded.path} (step {loaded.step})"
    )
    return 0


def parser(command: str, error: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = error(prog=f"nam-train {command}")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a checkpoint directory, or a run directory (its newest)",
    )
    if command == "eval":
        p.description = (
            "Loss, perplexity and bits per byte of a checkpoint on a corpus (--data.* options as training)."
        )
        p.add_argument(
            "--split", choices=SPLITS, help="rows to score (default: validation; all with --data.* options)"
        )
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    else:
        p.description = (
            "Sample text from a checkpoint (prompts from --prompt, --prompt-file or standard input)."
        )
        p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
        p.add_argument(
            "--prompt-file", action="append", default=[], metavar="FILE", help="a file holding a prompt"
        )
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
        p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
        p.add_argument("--top-p", type=float, default=0.95, help="sample within this probability mass")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--stop", action="append", default=[], help="stop a row at this text (repeatable)")
    return p

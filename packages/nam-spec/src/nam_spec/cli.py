"""``nam-spec``: what a family builds, layer by layer, without allocating it.

    nam-spec plan                             # preset nam56r: table and totals from the formula
    nam-spec plan --meta                      # ... and built on the meta device, tensors counted
    nam-spec plan --preset nam56r-small --json
    nam-spec plan NAM52 --preset nam56r-small # another family at a preset's geometry

Exit codes: 0 ok, 2 invalid input (unknown family or preset, a config that cannot build, a
family deeper than nam-layout's 1,000,000 layers), 130 interrupted (Ctrl-C), 141 stdout closed
early (``| head``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from nam_layout.shell import guarded
from nam_runtime.quiet import quiet
from nam_spec.config import SpecConfigError
from nam_spec.presets import PRESETS, preset

EXIT_INVALID = 2


def main(argv: Sequence[str] | None = None) -> int:
    quiet()  # megatron's and torch's notices at import; nam-spec's own messages stay
    return guarded("nam-spec", lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="nam-spec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="layer table and parameter totals of a family, built on the meta device")
    p.add_argument("family", nargs="?", help="a family name, e.g. NAM52 (default: the preset's family)")
    p.add_argument("--preset", default="nam56r", help=f"model preset (default nam56r): {', '.join(PRESETS)}")
    p.add_argument(
        "--backend", choices=["local", "te"], default="local", help="backend whose classes to name"
    )
    p.add_argument("--families", metavar="TOML", help="extra families from a nam-layout TOML file")
    p.add_argument(
        "--meta",
        action="store_true",
        help="also build the model on the meta device and count its tensors (nam_runtime.cpu answers megatron on CPU)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        config = preset(args.preset, backend=args.backend)
        if args.family:
            config = config.replace(family=args.family)
        if args.families:
            config = config.replace(families_file=args.families)
        layout = config.layout()
        description = _plan(layout, config, args.meta)
    except (KeyError, SpecConfigError) as e:
        print(f"nam-spec {args.command}: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(
            json.dumps(
                {"family": config.family, "preset": args.preset, **description.as_dict()}, sort_keys=True
            )
        )
    else:
        print(f"{config.family} with preset {args.preset} ({args.backend} backend): {layout.depth} layers")
        print(description.table())
    return 0


def _plan(layout, config, meta: bool):
    from nam_spec.description import describe
    from nam_spec.validation import validate

    validate(config, layout)
    if not meta:
        return describe(layout, config)
    if config.backend == "te":
        raise SpecConfigError("--meta builds the local backend only: TE modules cannot be built here")
    return _describe_on_meta(layout, config)


def _describe_on_meta(layout, config):
    """Build the whole model (TP = PP = 1) on the meta device. nam_runtime sets up a one-rank
    group (and megatron-core on CPU) unless the caller already has one."""
    import torch

    from nam_runtime import dist
    from nam_spec.description import describe
    from nam_spec.model import build_model

    owns = not dist.is_initialized()
    if owns:
        dist.initialize()
    try:
        with torch.device("meta"):
            model = build_model(layout, config)
        return describe(model)
    finally:
        if owns:
            dist.teardown()


if __name__ == "__main__":
    sys.exit(main())

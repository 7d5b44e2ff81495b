"""``nam-spec``: what a family builds, layer by layer, without allocating it.

    nam-spec plan NAM56R                      # full-size NAM56R: table and totals from the formula
    nam-spec plan NAM56R --meta               # ... and built on the meta device, tensors counted
    nam-spec plan NAM56R --preset nam56r-small --json

Exit codes: 0 ok, 2 invalid input (unknown family or preset, a config that cannot build).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from nam_layout import FamilyError, FamilyRegistry, LayoutError, PatternError
from nam_layout.families import REGISTRY
from nam_spec.config import SpecConfigError
from nam_spec.presets import PRESETS, preset

EXIT_INVALID = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nam-spec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="layer table and parameter totals of a family, built on the meta device")
    p.add_argument("family", help="a registered family name, e.g. NAM56R")
    p.add_argument(
        "--preset", default="nam56r", help=f"geometry preset (default nam56r): {', '.join(PRESETS)}"
    )
    p.add_argument(
        "--backend", choices=["local", "te"], default="local", help="backend whose classes to name"
    )
    p.add_argument("--families", action="append", metavar="TOML", help="register families from a TOML file")
    p.add_argument(
        "--meta",
        action="store_true",
        help="also build the model on the meta device and count its tensors (nam_runtime.cpu answers megatron on CPU)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        registry = FamilyRegistry(REGISTRY)
        for path in args.families or ():
            registry.load_toml(path)
        layout = registry.get(args.family).layout()
        config = preset(args.preset, backend=args.backend)
        description = _plan(layout, config, args.meta)
    except (KeyError, FamilyError, LayoutError, PatternError, SpecConfigError) as e:
        print(f"nam-spec {args.command}: {e}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(
            json.dumps(
                {"family": args.family, "preset": args.preset, **description.as_dict()}, sort_keys=True
            )
        )
    else:
        print(f"{args.family} with preset {args.preset} ({args.backend} backend): {layout.depth} layers")
        print(description.table())
    return 0


def _plan(layout, config, meta: bool):
    from nam_spec.config import validate
    from nam_spec.description import describe

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
            model = build_model(layout, config.replace(tensor_parallel=1, pipeline_parallel=1))
        return describe(model)
    finally:
        if owns:
            dist.teardown()


if __name__ == "__main__":
    sys.exit(main())

"""``nam-layout``: validate, show, split and translate layer patterns from the shell.

Exit codes: 0 valid, 2 invalid input (with a message that points at the problem; a depth is
at most 1,000,000 layers), 130 interrupted (Ctrl-C), 141 stdout closed early (``| head``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

from nam_layout.families import REGISTRY, Family, FamilyError, FamilyRegistry
from nam_layout.grammar import PatternError
from nam_layout.layout import Layout, LayoutError
from nam_layout.megatron import to_megatron
from nam_layout.shell import guarded
from nam_layout.stages import DEFAULT_COSTS, CostModel, StagePlan, plan_stages

EXIT_INVALID = 2
_POSITIONS_SHOWN = 16


def main(argv: Sequence[str] | None = None) -> int:
    return guarded("nam-layout", lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.json = args.json_before or args.json_after
    try:
        registry = FamilyRegistry(REGISTRY)
        for path in [*args.families_before, *args.families_after]:
            registry.load_toml(path)
        return args.run(args, registry)
    except (PatternError, LayoutError, FamilyError) as e:
        if args.json:
            print(json.dumps({"ok": False, **e.as_dict()}, sort_keys=True))
        else:
            print(f"nam-layout {args.command}: {e}", file=sys.stderr)
        return EXIT_INVALID


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line with exit code 2, like the errors of the checks themselves."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INVALID, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _shared_options(position: str) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (``position``).

    argparse lets the values a command parses replace the top level's, so each position parses
    into its own names (``json_before``, ``families_after``, ...) and main() merges them.
    """
    shared = argparse.ArgumentParser(add_help=False)
    group = shared.add_argument_group("options of every command (before or after the command name)")
    group.add_argument(
        "--json", dest=f"json_{position}", action="store_true", help="machine-readable output on stdout"
    )
    group.add_argument(
        "--families",
        dest=f"families_{position}",
        action="append",
        default=[],
        metavar="TOML",
        help="register families from a TOML file (repeatable)",
    )
    return shared


def _parser() -> argparse.ArgumentParser:
    shared = _shared_options("after")
    source = argparse.ArgumentParser(add_help=False)
    source.add_argument(
        "pattern", nargs="?", help="layer pattern, e.g. AEMEAEMEAEMR (letters A M E R -, '|' cuts)"
    )
    source.add_argument("--depth", type=int, help="number of layers to tile the pattern to")
    source.add_argument("--family", help="a registered family name instead of PATTERN --depth")
    staging = argparse.ArgumentParser(add_help=False)
    staging.add_argument(
        "--virtual", type=int, default=1, metavar="V", help="virtual stages per pipeline rank (default 1)"
    )
    staging.add_argument(
        "--cost",
        action="append",
        default=[],
        metavar="LETTER=W",
        help="cost of one layer of LETTER (A M E R -, or a letter the family registers), repeatable; "
        f"defaults {', '.join(f'{k}={v}' for k, v in DEFAULT_COSTS.items())}",
    )
    staging.add_argument(
        "--output-cost", type=float, default=0.0, metavar="W", help="cost of the output layer (last stage)"
    )
    staging.add_argument(
        "--embedding-cost", type=float, default=0.0, metavar="W", help="cost of the embedding (first stage)"
    )

    parser = _Parser(prog="nam-layout", description=__doc__, parents=[_shared_options("before")])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "validate", parents=[shared, source], help="check a pattern or family and print its counts"
    )
    p.set_defaults(run=_validate)
    p = sub.add_parser("show", parents=[shared, source, staging], help="a layer table and a one-line strip")
    p.add_argument("--stages", type=int, default=1, help="pipeline ranks to show the split for")
    p.set_defaults(run=_show)
    p = sub.add_parser("split", parents=[shared, source, staging], help="plan pipeline stages")
    p.add_argument("--stages", type=int, required=True, help="pipeline ranks P")
    p.set_defaults(run=_split)
    p = sub.add_parser(
        "translate", parents=[shared, source, staging], help="emit megatron-core's hybrid pattern"
    )
    p.add_argument("--to", choices=["megatron"], required=True, help="target notation")
    p.add_argument("--stages", type=int, default=1, help="pipeline ranks; > 1 plans and emits '|' cuts")
    p.add_argument(
        "--map", action="append", default=[], metavar="LETTER=SYMBOL", help="map a letter, e.g. R=M"
    )
    p.set_defaults(run=_translate)
    p = sub.add_parser("families", parents=[shared], help="list registered families")
    p.set_defaults(run=_families)
    return parser


def _resolve(args: argparse.Namespace, registry: FamilyRegistry) -> tuple[Layout, Family | None]:
    if args.family is not None:
        if args.pattern is not None or args.depth is not None:
            raise LayoutError("give either --family NAME or PATTERN --depth N, not both")
        family = registry.get(args.family)
        return family.layout(), family
    if args.pattern is None:
        raise LayoutError("give a PATTERN with --depth N, or --family NAME")
    if args.depth is None:
        raise LayoutError(f"PATTERN {args.pattern!r} needs --depth N (the number of layers to tile it to)")
    return Layout.tile(args.pattern, args.depth), None


def _cost_model(args: argparse.Namespace, layout: Layout) -> CostModel:
    accepted = f"expected LETTER=W, LETTER one of {' '.join(layout.letters)} and W a number >= 0, e.g. M=1.8"
    weights = dict(DEFAULT_COSTS)
    for item in args.cost:
        letter, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep:
            problem = "no '='"
        elif letter not in layout.letters:
            problem = f"unknown letter {letter!r}"
        elif not 0 <= weight < math.inf:
            problem = f"{value!r} is not a finite number >= 0"
        else:
            weights[letter] = weight
            continue
        raise LayoutError(f"--cost {item!r}: {problem}; {accepted}")
    return CostModel(weights, embedding=args.embedding_cost, output=args.output_cost)


def _plan(args: argparse.Namespace, layout: Layout) -> StagePlan:
    return plan_stages(layout, args.stages, args.virtual, _cost_model(args, layout))


def _validate(args: argparse.Namespace, registry: FamilyRegistry) -> int:
    layout, family = _resolve(args, registry)
    if args.json:
        _emit({"ok": True, "family": family.name if family else None, "layout": layout.to_dict()})
    else:
        name = f"{family.name}: " if family else ""
        print(f"valid: {name}{layout.pattern!r} at depth {layout.depth}: {_counts(layout)}")
    return 0


def _show(args: argparse.Namespace, registry: FamilyRegistry) -> int:
    layout, family = _resolve(args, registry)
    plan = _plan(args, layout)
    if args.json:
        _emit(
            {
                "ok": True,
                "family": family.name if family else None,
                "layout": layout.to_dict(),
                "plan": plan.to_dict(),
            }
        )
        return 0
    title = f"{family.name}: {family.description}" if family else "pattern"
    print(f"{title}\n  pattern {layout.pattern}   depth {layout.depth}   counts {_counts(layout)}")
    print(f"  strip   {_strip(layout, plan)}")
    print(f"\n  {'letter':<7}{'block':<20}{'count':>6}  layers (1-based)")
    for letter, block in layout.letters.items():
        if layout.counts[letter]:
            print(f"  {letter:<7}{block:<20}{layout.counts[letter]:>6}  {_compact(layout.positions(letter))}")
    print(f"\n  {'layer':>5}  letter  {'block':<20}stage")
    for chunk, (start, stop) in enumerate(plan.chunks):
        stage = f"rank {plan.rank(chunk)}" + (
            f" / virtual {plan.virtual_stage(chunk)}" if plan.virtual > 1 else ""
        )
        for i in range(start, stop):
            print(f"  {i + 1:>5}  {layout.kinds[i]:<6}  {layout.letters[layout.kinds[i]]:<20}{stage}")
    _print_plan_summary(plan)
    return 0


def _split(args: argparse.Namespace, registry: FamilyRegistry) -> int:
    layout, family = _resolve(args, registry)
    plan = _plan(args, layout)
    if args.json:
        _emit({"ok": True, "family": family.name if family else None, "plan": plan.to_dict()})
        return 0
    print(f"{plan.stages} stages x {plan.virtual} virtual over {layout.depth} layers: {plan.cut_pattern()}")
    print(f"  {'chunk':>5} {'rank':>4} {'virt':>4} {'layers':>11} {'cost':>8}  letters")
    for k, (a, b) in enumerate(plan.chunks):
        print(
            f"  {k:>5} {plan.rank(k):>4} {plan.virtual_stage(k):>4} {f'{a + 1}-{b}':>11} "
            f"{plan.chunk_costs[k]:>8.2f}  {layout.kinds[a:b]}"
        )
    _print_plan_summary(plan)
    return 0


def _translate(args: argparse.Namespace, registry: FamilyRegistry) -> int:
    layout, family = _resolve(args, registry)
    mapping = {}
    for item in args.map:
        letter, sep, symbol = item.partition("=")
        if not sep or len(letter) != 1 or len(symbol) != 1:
            raise LayoutError(f"--map {item!r}: expected LETTER=SYMBOL, e.g. --map R=M")
        mapping[letter] = symbol
    costs = _cost_model(args, layout)  # checked even when there is nothing to plan
    plan = (
        plan_stages(layout, args.stages, args.virtual, costs) if args.stages > 1 or args.virtual > 1 else None
    )
    pattern = to_megatron(layout, plan, map_letters=mapping)
    if args.json:
        _emit(
            {
                "ok": True,
                "family": family.name if family else None,
                "megatron": pattern,
                "map": mapping,
                "plan": plan.to_dict() if plan else None,
            }
        )
    else:
        print(pattern)
        for warning in plan.warnings if plan else ():
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def _families(args: argparse.Namespace, registry: FamilyRegistry) -> int:
    if args.json:
        _emit(
            {
                "ok": True,
                "families": [
                    {
                        "name": f.name,
                        "pattern": f.pattern,
                        "depth": f.depth,
                        "counts": f.layout().to_dict()["counts"],
                        "description": f.description,
                    }
                    for f in registry
                ],
            }
        )
        return 0
    print(f"{'family':<10} {'pattern':<16} {'depth':>5}  counts")
    for f in registry:
        print(f"{f.name:<10} {f.pattern:<16} {f.depth:>5}  {_counts(f.layout())}   {f.description}")
    return 0


def _print_plan_summary(plan: StagePlan) -> None:
    if plan.stages * plan.virtual > 1:
        costs = ", ".join(f"{c:.2f}" for c in plan.rank_costs)
        print(f"\n  rank costs {costs}   imbalance {plan.imbalance:.3f} (busiest / mean)")
    for warning in plan.warnings:
        print(f"  warning: {warning}")


def _emit(payload: dict[str, object]) -> None:
    print(json.dumps(payload, sort_keys=True))


def _counts(layout: Layout) -> str:
    return ", ".join(f"{k} {n}" for k, n in layout.counts.items() if n)


def _strip(layout: Layout, plan: StagePlan) -> str:
    """The depth in one line: groups of one pattern period, '|' at stage cuts."""
    period = len(layout.pattern) if not layout.has_cuts else layout.depth
    cuts = {a for a, _ in plan.chunks[1:]}
    out = []
    for i, letter in enumerate(layout.kinds):
        if i in cuts:
            out.append(" | ")
        elif i and i % period == 0:
            out.append(" ")
        out.append(letter)
    return "".join(out)


def _compact(positions: tuple[int, ...]) -> str:
    if len(positions) >= 4:
        step = positions[1] - positions[0]
        if all(b - a == step for a, b in itertools.pairwise(positions)):
            return f"{positions[0]}, {positions[1]}, ..., {positions[-1]} (every {step})"
    shown = ", ".join(map(str, positions[:_POSITIONS_SHOWN]))
    more = len(positions) - _POSITIONS_SHOWN
    return shown + (f", ... ({more} more)" if more > 0 else "")


if __name__ == "__main__":
    sys.exit(main())

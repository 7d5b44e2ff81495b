"""Each package declares exactly what its code imports.

For every workspace member: the distributions its ``src/`` imports equal its ``dependencies``
plus its extras (a declared dependency nothing imports, or an import nothing declares, is an
error), and what its ``tests/`` import is declared there or in its ``test`` group. Only the
standard library is needed, so the lint session runs it without the packages installed.

    python tools/check_dependencies.py
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Import name -> distribution, where it is not the import name with "_" read as "-".
DISTRIBUTIONS = {"megatron": "megatron-core"}

# Modules that need a distribution their own package does not declare: importing one counts as
# importing that distribution too.
NEEDS = {
    # its save() writes through strategies.filesystem_async, which needs psutil
    "megatron.core.dist_checkpointing": "psutil",
    # SummaryWriter needs tensorboard, which torch does not declare
    "torch.utils.tensorboard": "tensorboard",
}

# Optional seams, imported only where present and kept out of uv.lock (DESIGN.md, runtime policy):
# never declared.
OPTIONAL = {"mamba_ssm", "causal_conv1d", "transformer_engine"}


def _name(requirement: str) -> str:
    """The distribution a requirement string names, normalised (extras, versions, markers dropped)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"unreadable requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _imported_modules(folder: Path) -> set[str]:
    """Every absolute module a folder's Python files import (``from a import b`` gives a and a.b)."""
    out: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module)
                out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _distributions(folder: Path, own: str) -> set[str]:
    """The distributions a folder's code needs; its own package, local modules (test helpers) and
    the standard library left out."""
    local = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}
    modules = _imported_modules(folder)
    out = {need for module, need in NEEDS.items() if module in modules}
    for module in modules:
        top = module.partition(".")[0]
        if top in sys.stdlib_module_names or top in local or top in OPTIONAL:
            continue
        out.add(_name(DISTRIBUTIONS.get(top, top.replace("_", "-"))))
    return out - {own}


def check(member: Path) -> list[str]:
    """What is wrong with one member's declarations (empty: nothing)."""
    project = tomllib.loads((member / "pyproject.toml").read_text())
    own = _name(project["project"]["name"])
    runtime = {_name(r) for r in project["project"].get("dependencies", [])}
    extras = {_name(r) for rs in project["project"].get("optional-dependencies", {}).values() for r in rs}
    test = {_name(r) for r in project.get("dependency-groups", {}).get("test", [])}
    where = member.relative_to(ROOT)
    errors = []
    used = _distributions(member / "src", own)
    if unused := sorted((runtime | extras) - used):
        errors.append(
            f"{where}: dependencies {unused} are not imported by src/ (a test-only one goes in the test group)"
        )
    if undeclared := sorted(used - runtime - extras):
        errors.append(f"{where}: src/ imports {undeclared}, not declared in [project] dependencies")
    tests = member / "tests"
    if tests.is_dir() and (missing := sorted(_distributions(tests, own) - runtime - extras - test)):
        errors.append(
            f"{where}: tests/ import {missing}, declared neither in dependencies nor in the test group"
        )
    return errors


def main() -> int:
    workspace = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]["members"]
    members = sorted(p.parent for pattern in workspace for p in ROOT.glob(f"{pattern}/pyproject.toml"))
    errors = [e for member in members for e in check(member)]
    print("\n".join(errors) or f"dependencies match imports in {len(members)} packages")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

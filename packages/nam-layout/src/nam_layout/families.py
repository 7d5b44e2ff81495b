"""Named families: a pattern, a depth and the layer counts they must produce.

A family's name is not documentation; its pattern decides what gets built. Each family declares
the counts it expects, and building its layout fails closed when pattern or depth drift from them.
Users add families from a TOML file (see :func:`load_families`) without editing code.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from nam_layout.grammar import CUT, LETTERS, PatternError
from nam_layout.layout import Layout, LayoutError


class FamilyError(ValueError):
    """A family definition that is malformed, drifts from its declared counts, or is unknown.

    ``key`` names the field of the definition at fault (``pattern``, ``counts``, ...) when one is.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def as_dict(self) -> dict[str, object]:
        return {"error": "family", "message": str(self)}


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str
    depth: int
    counts: Mapping[str, int]  # expected layers per letter; letters left out must be absent
    description: str = ""
    extra_letters: Mapping[str, str] = field(default_factory=dict)  # letter -> block, beyond A M E R -

    @property
    def letters(self) -> Mapping[str, str]:
        return MappingProxyType({**LETTERS, **self.extra_letters})

    def layout(self) -> Layout:
        """The family's layout, after checking it produces exactly the declared counts."""
        layout = Layout.tile(self.pattern, self.depth, self.letters)
        expected = {k: self.counts.get(k, 0) for k in layout.letters}
        drift = {k: (expected[k], n) for k, n in layout.counts.items() if n != expected[k]}
        if drift:
            detail = "; ".join(
                f"{k}: declared {want}, pattern gives {got}" for k, (want, got) in drift.items()
            )
            raise FamilyError(
                f"family {self.name!r} drifted: {self.pattern!r} at depth {self.depth} does not produce its "
                f"declared counts ({detail}); fix the pattern, the depth or the declared counts",
                "counts",
            )
        return layout


BUILTIN: tuple[Family, ...] = (
    Family(
        "NAM56R",
        "AEMEAEMEAEMR",
        52,
        {"A": 13, "E": 22, "M": 13, "R": 4},
        "hybrid attention/MoE/Mamba with an M2RNN recurrent layer every 12th layer",
    ),
    Family(
        "NAM52", "AEME", 52, {"A": 13, "E": 26, "M": 13}, "hybrid attention/MoE/Mamba, no recurrent layers"
    ),
    Family(
        "NAM56R-MLA",
        "LEMELEMELEMR",
        52,
        {"L": 13, "E": 22, "M": 13, "R": 4},
        "NAM56R with multi-latent attention (L) in every attention layer, as the seed system trains it",
    ),
)


class FamilyRegistry:
    """Families by name. Registration validates, so a registered family always builds."""

    def __init__(self, families: Iterable[Family] = ()) -> None:
        self._families: dict[str, Family] = {}
        for family in families:
            self.register(family)

    def register(self, family: Family, *, replace: bool = False) -> None:
        problem = _definition_problem(family)
        if problem:
            key, text = problem
            raise FamilyError(f"family {family.name!r} {key}: {text}", key)
        family.layout()  # fail closed now, not at build time
        if family.name in self._families and not replace:
            raise FamilyError(f"family {family.name!r} is already registered; choose another name", "name")
        self._families[family.name] = family

    def get(self, name: str) -> Family:
        try:
            return self._families[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._families), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise FamilyError(f"unknown family {name!r}; known: {', '.join(self._families)}{hint}") from None

    def __iter__(self) -> Iterator[Family]:
        return iter(self._families.values())

    def __contains__(self, name: object) -> bool:
        return name in self._families

    def load_toml(self, path: str | Path) -> list[Family]:
        """Register every family of a TOML file; returns them. Nothing is registered if any is bad."""
        families = load_families(path)
        trial = FamilyRegistry(self)
        for family in families:
            try:
                trial.register(family)
            except FamilyError as e:
                raise FamilyError(f"{path}: [family.{family.name}]: {e}", e.key) from e
        self._families = trial._families
        return families


def load_families(path: str | Path) -> list[Family]:
    """Read families from TOML. Each table under ``[family]`` is one family::

    [family.MYNET]
    pattern = "AEMM"                       # grammar of nam-layout, '|' cuts allowed
    depth = 24
    counts = { A = 6, E = 6, M = 12 }      # every letter the pattern uses
    description = "what it is for"         # optional
    letters = { G = "gated delta net" }    # optional extra letters this family registers
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FamilyError(f"cannot read family file {str(path)!r}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise FamilyError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from e
    except tomllib.TOMLDecodeError as e:
        raise FamilyError(f"{path}: not valid TOML: {e}") from e
    tables = data.get("family")
    if not isinstance(tables, dict) or not tables:
        raise FamilyError(f"{path}: no [family.NAME] tables found; see nam_layout.families.load_families")
    families = []
    allowed = {"pattern", "depth", "counts", "description", "letters"}
    for name, table in tables.items():
        where = f"{path}: [family.{name}]"
        if not isinstance(table, dict):
            raise FamilyError(f"{where} must be a table, got {table!r}")
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise FamilyError(f"{where}: unknown key(s) {unknown}; accepted: {sorted(allowed)}")
        missing = sorted({"pattern", "depth", "counts"} - set(table))
        if missing:
            raise FamilyError(f"{where}: missing key(s) {missing}")
        family = Family(
            name=name,
            pattern=table["pattern"],
            depth=table["depth"],
            counts=table["counts"],
            description=table.get("description", ""),
            extra_letters=table.get("letters", {}),
        )
        problem = _definition_problem(family)
        if problem:
            key, text = problem
            raise FamilyError(f"{where} {key}: {text}", key)
        try:
            family.layout()
        except PatternError as e:
            raise FamilyError(f"{where} pattern: {e}", "pattern") from e
        except LayoutError as e:
            raise FamilyError(f"{where} depth: {e}", "depth") from e
        except FamilyError as e:
            raise FamilyError(f"{where} counts: {e}", "counts") from e
        families.append(family)
    return families


def _definition_problem(family: Family) -> tuple[str, str] | None:
    """The field of ``family`` that is malformed and what is wrong with it, or None if none is."""
    name = family.name
    if not isinstance(name, str) or not name or not name.isprintable() or " " in name:
        return "name", f"{name!r} must be a non-empty printable string without spaces"
    if not isinstance(family.pattern, str):
        return "pattern", f"must be a string of layer letters, got {family.pattern!r}"
    if isinstance(family.depth, bool) or not isinstance(family.depth, int):
        return "depth", f"must be an integer, got {family.depth!r}"
    if not isinstance(family.description, str):
        return "description", f"must be a string, got {family.description!r}"
    builtin = f"{' '.join(LETTERS)} {CUT}"
    if not isinstance(family.extra_letters, Mapping):
        return (
            "letters",
            f'must map letters to block names, e.g. {{ G = "gated delta net" }}, got {family.extra_letters!r}',
        )
    for letter, block in family.extra_letters.items():
        if len(letter) != 1 or not letter.isascii() or not letter.isupper() or letter in LETTERS:
            return (
                "letters",
                f"{letter!r} must be one uppercase ASCII letter not already built in ({builtin})",
            )
        if not isinstance(block, str) or not block:
            return "letters", f"{letter!r} needs a block name (a non-empty string), got {block!r}"
    counts = family.counts
    if not isinstance(counts, Mapping) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()
    ):
        return "counts", f"must map letters to non-negative integers, e.g. {{ A = 6, M = 6 }}, got {counts!r}"
    unknown = sorted(set(counts) - set(family.letters))
    if unknown:
        return "counts", f"name unknown letter(s) {unknown}; accepted: {' '.join(family.letters)}"
    return None


REGISTRY = FamilyRegistry(BUILTIN)


def get_family(name: str) -> Family:
    return REGISTRY.get(name)

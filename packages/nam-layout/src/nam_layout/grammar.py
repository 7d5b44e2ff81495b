"""The pattern grammar: which characters a pattern may hold and how it splits at stage cuts.

A pattern is a non-empty ASCII string of layer letters, optionally cut into pipeline segments
by ``|``. Each letter is one whole residual layer. Checks run in linear time without recursion,
so a pattern of a million characters is as safe as a short one.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

CUT = "|"

# letter -> the block it builds (DESIGN.md, "The letters").
LETTERS: Mapping[str, str] = MappingProxyType(
    {
        "A": "attention",
        "M": "Mamba",
        "E": "MoE experts",
        "R": "M2RNN recurrent",
        "-": "dense MLP",
        "L": "multi-latent attention",
    }
)

# A letter variant: its own letter, so that the pattern says which layers are built which way,
# standing for the same block as its base letter (variant -> base). Everything that counts,
# plans or describes layers can group a variant with its base.
VARIANTS: Mapping[str, str] = MappingProxyType({"L": "A"})

_CONTEXT = 30  # characters shown either side of an offending position


class PatternError(ValueError):
    """A pattern that breaks the grammar; ``str()`` shows the pattern with a caret at ``position``."""

    def __init__(self, message: str, pattern: str, position: int | None, accepted: str) -> None:
        self.message = message
        self.pattern = pattern
        self.position = position
        self.accepted = accepted
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"invalid pattern: {self.message}"]
        if self.position is not None:
            lines += _caret(self.pattern, self.position)
        lines.append(f"accepted: {self.accepted}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {
            "error": "pattern",
            "message": self.message,
            "position": self.position,
            "accepted": self.accepted,
        }


def describe_letters(letters: Mapping[str, str]) -> str:
    """'A (attention), M (Mamba), ..., L (multi-latent attention, a variant of A), | (pipeline-stage
    cut)': the accepted alphabet in words."""
    return (
        ", ".join(f"{k} ({letter_name(k, v)})" for k, v in letters.items()) + f", {CUT} (pipeline-stage cut)"
    )


def letter_name(letter: str, block: str) -> str:
    """``block``, and for a variant the letter it varies: 'multi-latent attention, a variant of A'."""
    return f"{block}, a variant of {VARIANTS[letter]}" if letter in VARIANTS else block


def split_segments(pattern: str, letters: Mapping[str, str] = LETTERS) -> tuple[str, ...]:
    """Check ``pattern`` against the grammar and return its segments (one when it has no cut).

    ``letters`` is the alphabet in force: the built-in letters plus any a family registers.
    """
    accepted = describe_letters(letters)
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    if not pattern:
        raise PatternError(
            "the pattern is empty; it needs at least one layer letter", pattern, None, accepted
        )
    allowed = set(letters) | {CUT}
    if not set(pattern) <= allowed:  # fast path in C; find the first culprit only on failure
        position = next(i for i, ch in enumerate(pattern) if ch not in allowed)
        raise PatternError(
            _why_not_allowed(pattern[position], position, letters), pattern, position, accepted
        )
    segments = tuple(pattern.split(CUT))
    start = 0
    for number, segment in enumerate(segments):
        if not segment:
            where = (
                "at the start"
                if number == 0
                else "at the end"
                if number == len(segments) - 1
                else "between cuts"
            )
            position = max(0, start - 1) if number else 0
            raise PatternError(
                f"empty pipeline segment {where}: every '{CUT}' must separate two non-empty segments",
                pattern,
                position,
                accepted,
            )
        start += len(segment) + 1
    return segments


def _why_not_allowed(ch: str, position: int, letters: Mapping[str, str]) -> str:
    if ch.isspace():
        return f"whitespace ({ch!r}) at position {position}; patterns hold no spaces or newlines"
    if not ch.isascii():
        return f"non-ASCII character {ch!r} (U+{ord(ch):04X}) at position {position}"
    if ch.upper() in letters and ch != ch.upper():
        return f"lowercase {ch!r} at position {position}; layer letters are uppercase (did you mean {ch.upper()!r}?)"
    return f"{ch!r} at position {position} is not a layer letter"


def _caret(pattern: str, position: int) -> list[str]:
    lo = max(0, position - _CONTEXT)
    hi = min(len(pattern), position + _CONTEXT + 1)
    prefix = "..." if lo > 0 else ""
    suffix = "..." if hi < len(pattern) else ""
    shown = pattern[lo:hi].replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return [f"  {prefix}{shown}{suffix}", "  " + " " * (len(prefix) + position - lo) + "^"]

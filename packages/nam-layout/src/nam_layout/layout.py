"""The ``Layout`` value: a pattern tiled to a depth, one letter per layer."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from nam_layout.grammar import CUT, LETTERS, split_segments

JSON_SCHEMA = 1
# A layout holds one letter per layer, so a typo of a depth (1e11) would allocate that many bytes
# before anything could be said. Real models have hundreds of layers; a million is as long as
# the grammar promises to check in linear time.
MAX_DEPTH = 1_000_000


class LayoutError(ValueError):
    """A pattern that parses but does not fit the requested depth, or a malformed layout."""

    def as_dict(self) -> dict[str, object]:
        return {"error": "layout", "message": str(self)}


@dataclass(frozen=True)
class Layout:
    """Per-layer block letters of a model, with its pipeline segments.

    Build one with :meth:`tile`. Two layouts are equal (and hash alike) when they build the same
    letters in the same segments, whatever pattern string produced them.
    """

    kinds: str  # one letter per layer, layer i at kinds[i]
    segments: tuple[tuple[int, int], ...]  # [start, stop) layer ranges of the explicit '|' segments
    pattern: str = field(compare=False)
    letters: Mapping[str, str] = field(default=LETTERS, compare=False, repr=False)

    @classmethod
    def tile(cls, pattern: str, depth: int, letters: Mapping[str, str] = LETTERS) -> Layout:
        """Tile ``pattern`` to ``depth`` layers.

        Without cuts, layer i gets ``pattern[i % len(pattern)]``. With ``|`` cuts, the segments
        are concatenated as written and must total exactly ``depth``.
        """
        segments = split_segments(pattern, letters)
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise LayoutError(f"depth must be a whole number of layers, got {depth!r}")
        if not 1 <= depth <= MAX_DEPTH:
            raise LayoutError(f"depth must be between 1 and {MAX_DEPTH:,} layers, got {depth:,}")
        if len(segments) == 1:
            repeats = -(-depth // len(pattern))
            return cls((pattern * repeats)[:depth], ((0, depth),), pattern, MappingProxyType(dict(letters)))
        total = sum(map(len, segments))
        if total != depth:
            sizes = "+".join(str(len(s)) for s in segments)
            raise LayoutError(
                f"the {len(segments)} segments of a cut pattern are used as written and total "
                f"{sizes} = {total} layers, but depth is {depth}; cut patterns are not tiled, so "
                f"their segments must add up to the depth exactly"
            )
        bounds, start = [], 0
        for segment in segments:
            bounds.append((start, start + len(segment)))
            start += len(segment)
        return cls("".join(segments), tuple(bounds), pattern, MappingProxyType(dict(letters)))

    @property
    def depth(self) -> int:
        return len(self.kinds)

    @property
    def has_cuts(self) -> bool:
        return len(self.segments) > 1

    @cached_property
    def counts(self) -> Mapping[str, int]:
        """Layers per letter, every letter of the alphabet present (zero where absent)."""
        return MappingProxyType({letter: self.kinds.count(letter) for letter in self.letters})

    @cached_property
    def _indices(self) -> Mapping[str, tuple[int, ...]]:
        found: dict[str, list[int]] = {letter: [] for letter in self.letters}
        for i, letter in enumerate(self.kinds):
            found[letter].append(i)
        return MappingProxyType({k: tuple(v) for k, v in found.items()})

    def indices(self, letter: str) -> tuple[int, ...]:
        """0-based layer indices holding ``letter``."""
        if letter not in self.letters:
            raise KeyError(f"{letter!r} is not a letter of this layout; letters: {''.join(self.letters)}")
        return self._indices[letter]

    def positions(self, letter: str) -> tuple[int, ...]:
        """1-based layer numbers holding ``letter`` (how people count layers)."""
        return tuple(i + 1 for i in self.indices(letter))

    def segment_kinds(self) -> tuple[str, ...]:
        return tuple(self.kinds[a:b] for a, b in self.segments)

    def cut_pattern(self) -> str:
        """The layout as one pattern string, with '|' at its explicit segments."""
        return CUT.join(self.segment_kinds())

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": JSON_SCHEMA,
            "pattern": self.pattern,
            "depth": self.depth,
            "kinds": self.kinds,
            "counts": dict(self.counts),
            "segments": [list(s) for s in self.segments],
            "positions": {k: list(self.positions(k)) for k in self.letters},
            "letters": dict(self.letters),
        }

    def to_json(self) -> str:
        """Stable JSON: fixed key order, no whitespace variation between runs."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Layout:
        """Rebuild from :meth:`to_json`; the pattern is re-tiled and must reproduce the stored layers."""
        try:
            data = json.loads(text)
            schema, pattern, depth = data["schema"], data["pattern"], data["depth"]
            kinds, letters = data["kinds"], data.get("letters", dict(LETTERS))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LayoutError(
                f"not a layout JSON document ({e}); expected the output of Layout.to_json()"
            ) from e
        if schema != JSON_SCHEMA:
            raise LayoutError(
                f"layout JSON schema {schema!r} is not supported; this version reads {JSON_SCHEMA}"
            )
        layout = cls.tile(pattern, depth, letters)
        if layout.kinds != kinds:
            raise LayoutError(
                "layout JSON is inconsistent: its 'kinds' differ from tiling its 'pattern' to 'depth'"
            )
        return layout

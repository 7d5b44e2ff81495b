"""C++ structure channels per token, from tree-sitter's C++ parser (the ``nam-embed[cpp]`` extra).

For every token, given by its character span in the source (a tokenizer's offset mapping):

- the token's node: the innermost *named* syntax node covering the token's first
  non-whitespace character (a whitespace-only token: its first character; a BPE token with a
  leading space therefore belongs to the word after the space, and a token spanning several
  nodes to the node of its first byte);
- ``depth``: the node's number of named ancestors (the translation unit is 0);
- ``sibling``: the node's index among its parent's named children (0 for the root);
- ``node_type``: its id in ``cpp_vocab.NODE_TYPES`` (``<unknown>`` for types not listed);
- ``category``: see ``cpp_vocab.CATEGORIES``: the category of the innermost node around the token
  that has one;
- ``dependency``: the number of scope bodies around the node (itself included): namespace and
  ``extern "C"`` bodies, class/struct/union and enum bodies, function and lambda bodies. File
  scope (includes, top-level declarations, the head of a top-level function) is 0; a class member
  is 1; a statement in a method defined in that class is 2.

A token with an empty span covers no source and gets 0 in every channel (node type ``<none>``).
Code that does not parse still yields channels: tree-sitter recovers with ``ERROR`` nodes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nam_embed.cpp_vocab import (
    CHANNELS,
    FUNCTION_TYPES,
    NODE_TYPE_IDS,
    NONE_ID,
    SCOPE_BODIES,
    UNKNOWN_ID,
    category_of,
)

if TYPE_CHECKING:
    from torch import Tensor

Row = tuple[int, int, int, int, int]  # one token's channels, in CHANNELS order


@functools.cache
def _parser() -> Any:
    try:
        import tree_sitter
        import tree_sitter_cpp
    except ImportError as err:
        raise ImportError(
            "C++ structure extraction needs tree-sitter and tree-sitter-cpp: pip install 'nam-embed[cpp]'"
        ) from err
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_cpp.language()))


def _node_channels(root: Any) -> dict[int, Row]:
    """node id -> (category, dependency, depth, sibling, node_type) for every named node."""
    out: dict[int, Row] = {}
    root_cat = category_of(root.type)
    stack = [(root, 0, 0, 0 if root_cat is None else root_cat, 0)]
    while stack:
        node, depth, sibling, inherited_cat, inherited_dep = stack.pop()
        own = category_of(node.type)
        cat = inherited_cat if own is None else own
        parent = node.parent
        opens_scope = node.type in SCOPE_BODIES or (
            node.type == "compound_statement" and parent is not None and parent.type in FUNCTION_TYPES
        )
        dep = inherited_dep + opens_scope
        out[node.id] = (cat, dep, depth, sibling, NODE_TYPE_IDS.get(node.type, UNKNOWN_ID))
        for i, child in enumerate(node.named_children):
            stack.append((child, depth + 1, i, cat, dep))
    return out


def _byte_offsets(source: str) -> list[int] | None:
    """Byte offset of every character boundary, or None when characters are bytes (ASCII)."""
    if source.isascii():
        return None
    out = [0]
    for ch in source:
        out.append(out[-1] + len(ch.encode("utf-8")))
    return out


def extract_cpp_structure(source: str, offsets: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """Structure channels of C++ ``source`` for tokens at character spans ``offsets``.

    Returns one int64 tensor of shape [len(offsets)] per channel in ``CHANNELS``,
    ready for ``StructureEmbedding`` (after stacking rows) with ``StructureSchema.default()``.
    """
    import torch  # here: cpp_structure_rows serves callers without torch

    rows = cpp_structure_rows(source, offsets)
    values = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(CHANNELS))
    return {name: values[:, i].contiguous() for i, name in enumerate(CHANNELS)}


def cpp_structure_rows(source: str, offsets: Sequence[tuple[int, int]]) -> list[Row]:
    """``extract_cpp_structure`` as plain ints, one row per token, without torch: nam-train's data
    workers call it, and importing torch would cost each of them seconds."""
    for i, span in enumerate(offsets):
        if len(span) != 2 or not 0 <= span[0] <= span[1] <= len(source):
            raise ValueError(
                f"extract_cpp_structure: token {i} has span {tuple(span)}; need 0 <= start <= end <= "
                f"{len(source)} (character offsets into the source)"
            )
    data = source.encode("utf-8")
    root = _parser().parse(data).root_node
    table = _node_channels(root)
    to_byte = _byte_offsets(source)
    rows: list[Row] = []
    for start, end in offsets:
        if start == end:
            rows.append((0, 0, 0, 0, NONE_ID))
            continue
        first = start
        while first < end and source[first].isspace():
            first += 1
        if first == end:
            first = start
        b = first if to_byte is None else to_byte[first]
        width = 1 if to_byte is None else to_byte[first + 1] - b
        node = root.named_descendant_for_byte_range(b, b + width)
        rows.append(table[node.id])
    return rows

"""C++ structure extraction on real snippets, with expectations checked by hand against the tree."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nam_embed.cpp import extract_cpp_structure
from nam_embed.cpp_vocab import CATEGORIES, CHANNELS, NODE_TYPE_IDS, NODE_TYPES
from nam_embed.structure import StructureConfig, StructureEmbedding, StructureSchema


def _tokens(source: str) -> list[tuple[int, int]]:
    """Word/symbol tokens carrying their leading whitespace, as BPE tokenizers emit them."""
    return [(m.start(), m.end()) for m in re.finditer(r"\s*(\w+|[^\w\s])", source)]


def _rows(source: str) -> list[tuple[str, str, int, int, int, str]]:
    spans = _tokens(source)
    ch = extract_cpp_structure(source, spans)
    return [
        (
            source[s:e].strip(),
            CATEGORIES[int(ch["category"][i])],
            int(ch["dependency"][i]),
            int(ch["depth"][i]),
            int(ch["sibling"][i]),
            NODE_TYPES[int(ch["node_type"][i])],
        )
        for i, (s, e) in enumerate(spans)
    ]


NESTED = """#include <vector>
// sum
namespace ns {
struct S {
  int f(int a) { return a + 1; }
};
}
int x = 42;
"""


def test_namespace_class_method() -> None:
    rows = _rows(NESTED)
    # token, category, dependency, depth, sibling, node type
    want = {
        0: ("#", "preprocessor", 0, 1, 0, "preproc_include"),
        3: ("vector", "preprocessor", 0, 2, 0, "system_lib_string"),  # <vector> is one node
        5: ("/", "comment", 0, 1, 1, "comment"),
        8: ("namespace", "declaration", 0, 1, 2, "namespace_definition"),
        9: ("ns", "declaration", 0, 2, 0, "namespace_identifier"),
        10: ("{", "declaration", 1, 2, 1, "declaration_list"),  # the namespace body opens level 1
        11: ("struct", "declaration", 1, 3, 0, "struct_specifier"),
        12: ("S", "declaration", 1, 4, 0, "type_identifier"),
        14: ("int", "declaration", 2, 6, 0, "primitive_type"),  # a member's head: level 2
        15: ("f", "declaration", 2, 7, 0, "field_identifier"),
        18: ("a", "declaration", 2, 9, 1, "identifier"),  # the parameter, 2nd child of its declaration
        20: ("{", "statement", 3, 6, 2, "compound_statement"),  # the method body: level 3
        21: ("return", "statement", 3, 7, 0, "return_statement"),
        22: ("a", "expression", 3, 9, 0, "identifier"),
        23: ("+", "expression", 3, 8, 0, "binary_expression"),
        24: ("1", "literal", 3, 9, 1, "number_literal"),
        30: ("int", "declaration", 0, 2, 0, "primitive_type"),  # back at file scope
        33: ("42", "literal", 0, 3, 1, "number_literal"),
    }
    for i, row in want.items():
        assert rows[i] == row, i


def test_template_function_with_lambda() -> None:
    rows = _rows(
        "template <typename T>\nT twice(T v) {\n  auto f = [](T x) { return x * 2; };\n  return f(v);\n}"
    )
    assert rows[0] == ("template", "declaration", 0, 1, 0, "template_declaration")
    assert rows[2] == ("typename", "declaration", 0, 3, 0, "type_parameter_declaration")
    assert rows[6] == ("twice", "declaration", 0, 4, 0, "identifier")
    assert rows[11] == ("{", "statement", 1, 3, 2, "compound_statement")
    assert rows[15] == ("[", "expression", 1, 7, 0, "lambda_capture_specifier")
    assert rows[19] == ("x", "declaration", 1, 10, 1, "identifier")  # lambda parameter
    assert rows[22] == ("return", "statement", 2, 8, 0, "return_statement")  # function + lambda body
    assert rows[29] == ("return", "statement", 1, 4, 1, "return_statement")
    assert rows[31] == ("(", "expression", 1, 6, 1, "argument_list")


def test_include_guard_does_not_swallow_the_code_it_guards() -> None:
    rows = _rows("#ifndef A_H\n#define A_H 1\nint g();\n#endif\n")
    assert rows[1] == ("ifndef", "preprocessor", 0, 1, 0, "preproc_ifdef")
    assert rows[6] == ("1", "preprocessor", 0, 3, 1, "preproc_arg")
    assert rows[7] == ("int", "declaration", 0, 3, 0, "primitive_type")
    assert rows[12] == ("#", "preprocessor", 0, 1, 0, "preproc_ifdef")


def test_broken_code_yields_error_nodes_not_a_crash() -> None:
    rows = _rows("int main( {\n  return 0;\n")
    assert [r[5] for r in rows] == [
        "primitive_type",
        "identifier",
        "ERROR",
        "ERROR",
        "return_statement",
        "number_literal",
        "return_statement",
    ]
    assert rows[4][1] == "statement" and rows[0][1] == "other"  # the root is an ERROR node


def test_character_offsets_past_non_ascii_text() -> None:
    source = "// héllo wörld ✓\nint y;"
    spans = _tokens(source)
    ch = extract_cpp_structure(source, spans)
    types = [NODE_TYPES[int(t)] for t in ch["node_type"]]
    # Byte offsets differ from character offsets after the comment: misreading them would put
    # `int` and `y` inside the comment.
    assert types[-3:] == ["primitive_type", "identifier", "declaration"]


def test_empty_spans_and_whole_source_token() -> None:
    source = "int v = 1;"
    ch = extract_cpp_structure(source, [(0, 0), (0, len(source)), (3, 4)])
    assert [int(ch[c][0]) for c in CHANNELS] == [0, 0, 0, 0, NODE_TYPE_IDS["<none>"]]
    # A token spanning several nodes takes the innermost node at its first byte.
    assert NODE_TYPES[int(ch["node_type"][1])] == "primitive_type"
    # A whitespace-only token takes the node around its first character.
    assert NODE_TYPES[int(ch["node_type"][2])] == "declaration"


def test_bad_spans_name_the_token() -> None:
    with pytest.raises(ValueError, match=r"token 1 has span \(3, 99\); need 0 <= start <= end <= 10"):
        extract_cpp_structure("int v = 1;", [(0, 3), (3, 99)])
    with pytest.raises(ValueError, match=r"token 0 has span \(4, 2\)"):
        extract_cpp_structure("int v = 1;", [(4, 2)])


def test_channels_feed_the_default_schema() -> None:
    spans = _tokens(NESTED)
    ch = extract_cpp_structure(NESTED, spans)
    ids = torch.zeros(1, len(spans), dtype=torch.long)
    module = StructureEmbedding(StructureConfig(), 32)
    out = module({k: v.unsqueeze(0) for k, v in ch.items()}, ids)
    assert out.shape == (1, len(spans), 32)


@settings(max_examples=60, deadline=None)
@given(
    source=st.text(alphabet=st.sampled_from(list("int x=0;{}()[]<>#\"'/*\\\n é✓abc+-:")), max_size=200),
    cuts=st.lists(st.integers(0, 200), max_size=40),
)
def test_any_text_and_spans_give_channels_in_range(source: str, cuts: list[int]) -> None:
    bounds = sorted({min(c, len(source)) for c in cuts} | {0, len(source)})
    spans = list(itertools.pairwise(bounds))
    ch = extract_cpp_structure(source, spans)
    schema = StructureSchema.default()
    for name in CHANNELS:
        assert ch[name].shape == (len(spans),) and ch[name].dtype == torch.int64
        assert (ch[name] >= 0).all()
    assert (ch["category"] < schema["category"].vocab).all()
    assert (ch["node_type"] < schema["node_type"].vocab).all()

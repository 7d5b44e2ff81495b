"""The letter table: one module per letter declares everything nam-spec knows about it, and no
other module of nam-spec names a letter (the guard that keeps per-letter knowledge in one place)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import tiny

import nam_spec
from nam_layout import Layout
from nam_spec.letters import LETTERS, SPEC_LETTERS, Letter, letter
from nam_spec.letters.base import norm_bytes

SOURCE = Path(nam_spec.__file__).parent
# a letter as a string literal: "A", 'E', "-" ... (quotes around one pattern letter)
LETTER_LITERAL = re.compile(r"""(?<![\w\\])(["'])[AEMRL\-]\1""")
REQUIRED = ("spec", "core", "spec_core", "params", "summary", "inner_activations")


def test_the_table_holds_the_buildable_letters_each_declaring_every_part() -> None:
    assert SPEC_LETTERS == "AEMR-L"
    for key, block in LETTERS.items():
        assert isinstance(block, Letter) and block.letter == key and block.name
        missing = [m for m in REQUIRED if getattr(type(block), m) is getattr(Letter, m)]
        assert not missing, f"letter {key!r} ({type(block).__name__}) does not declare {missing}"
        assert block.selective, f"letter {key!r} declares no selective recompute unit"
    with pytest.raises(KeyError, match="nam-spec has no block for letter 'G'; it builds A E M R -"):
        letter("G")


def test_no_module_outside_the_letters_names_a_letter() -> None:
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        if "letters" in path.relative_to(SOURCE).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if LETTER_LITERAL.search(code):
                offenders.append(f"{path.relative_to(SOURCE)}:{number}: {line.strip()}")
    assert not offenders, "per-letter knowledge belongs in nam_spec/letters/:\n" + "\n".join(offenders)


@pytest.mark.parametrize("key", list(SPEC_LETTERS))
def test_recompute_policies_order_the_kept_bytes(key: str) -> None:
    config = tiny(seq_length=64)
    block = LETTERS[key]
    none, selective, full = (block.activations(config, 2, p) for p in ("none", "selective", "full"))
    assert full < selective < none or (full < selective == none and key == "A")
    assert selective >= norm_bytes(config, 128)


def test_only_letters_of_the_layout_reach_megatrons_config(megatron_single_rank: None) -> None:
    from nam_spec.transformer_config import transformer_config

    without_e = transformer_config(tiny(), Layout.tile("AM", 2))
    with_e = transformer_config(tiny(), Layout.tile("AE", 2))
    assert without_e.num_moe_experts is None and with_e.num_moe_experts == 4
    assert transformer_config(
        tiny(recompute="selective"), Layout.tile("AE", 2), letter="E"
    ).recompute_modules == ["moe_act"]

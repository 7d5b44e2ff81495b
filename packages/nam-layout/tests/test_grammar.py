import time

import pytest

from nam_layout import LETTERS, VARIANTS, PatternError, letter_name, split_segments


def test_segments_without_and_with_cuts() -> None:
    assert split_segments("AEMEAEMEAEMR") == ("AEMEAEMEAEMR",)
    assert split_segments("AEM|E-R|A") == ("AEM", "E-R", "A")


@pytest.mark.parametrize(
    ("pattern", "position", "fragment"),
    [
        ("AEMaEM", 3, "lowercase 'a' at position 3; layer letters are uppercase (did you mean 'A'?)"),
        ("AEXM", 2, "'X' at position 2 is not a layer letter"),
        ("AE M", 2, "whitespace (' ') at position 2"),
        ("AEM\n", 3, "whitespace ('\\n') at position 3"),
        ("AÉM", 1, "non-ASCII character 'É' (U+00C9) at position 1"),
        ("|AEM", 0, "empty pipeline segment at the start"),
        ("AEM|", 3, "empty pipeline segment at the end"),
        ("AE||M", 2, "empty pipeline segment between cuts"),
        ("*EME", 0, "'*' at position 0 is not a layer letter"),
    ],
)
def test_bad_characters_point_at_position(pattern: str, position: int, fragment: str) -> None:
    with pytest.raises(PatternError) as info:
        split_segments(pattern)
    err = info.value
    assert err.position == position
    assert fragment in err.message
    text = str(err)
    shown, caret = text.splitlines()[1:3]
    # the caret sits under the offending character of the echoed pattern
    assert caret.index("^") == 2 + position
    assert shown[2 + position] == (pattern[position] if not pattern[position].isspace() else " ")
    assert "accepted: A (attention), M (Mamba), E (MoE experts), R (M2RNN recurrent), - (dense MLP)" in text


def test_empty_pattern() -> None:
    with pytest.raises(PatternError, match="the pattern is empty"):
        split_segments("")


def test_family_letters_extend_the_alphabet() -> None:
    letters = {**LETTERS, "G": "gated delta net"}
    assert split_segments("AGM", letters) == ("AGM",)
    with pytest.raises(PatternError, match="'G' at position 1"):
        split_segments("AGM")


def test_non_string_rejected() -> None:
    with pytest.raises(TypeError, match="pattern must be a str"):
        split_segments(None)  # type: ignore[arg-type]


def test_million_character_pattern_is_linear_and_points_far_right() -> None:
    n = 10**6
    start = time.perf_counter()
    assert split_segments("AEME" * (n // 4)) == ("AEME" * (n // 4),)
    with pytest.raises(PatternError) as info:
        split_segments("A" * (n - 1) + "x")
    elapsed = time.perf_counter() - start
    assert info.value.position == n - 1
    lines = str(info.value).splitlines()
    assert lines[1].startswith("  ...") and len(lines[1]) < 80  # a window, not a megabyte of echo
    assert lines[2].index("^") == lines[1].index("x")
    assert elapsed < 5  # generous: guards against quadratic work, not a timing benchmark


def test_a_variant_is_a_letter_of_its_own_named_with_its_base() -> None:
    assert VARIANTS == {"L": "A"} and set(VARIANTS) <= set(LETTERS)
    assert letter_name("L", LETTERS["L"]) == "multi-latent attention, a variant of A"
    assert letter_name("A", LETTERS["A"]) == "attention"
    with pytest.raises(PatternError) as err:
        split_segments("AEl")
    assert "did you mean 'L'?" in str(err.value)
    assert "L (multi-latent attention, a variant of A)" in err.value.accepted

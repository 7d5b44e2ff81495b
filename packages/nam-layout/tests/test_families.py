from pathlib import Path

import pytest

from nam_layout import BUILTIN, Family, FamilyError, FamilyRegistry, get_family, load_families


def test_builtin_families_match_design_table() -> None:
    nam56r, nam52 = get_family("NAM56R"), get_family("NAM52")
    assert (nam56r.pattern, nam56r.depth) == ("AEMEAEMEAEMR", 52)
    assert dict(nam56r.layout().counts) == {"A": 13, "M": 13, "E": 22, "R": 4, "-": 0, "L": 0}
    assert (nam52.pattern, nam52.depth) == ("AEME", 52)
    assert dict(nam52.layout().counts) == {"A": 13, "M": 13, "E": 26, "R": 0, "-": 0, "L": 0}


def test_a_family_says_which_attention_layers_are_the_mla_variant() -> None:
    mla = get_family("NAM56R-MLA").layout()
    assert mla.positions("L") == get_family("NAM56R").layout().positions("A") and mla.counts["A"] == 0
    mixed = Family("MIXED", "AEMELEME", 8, {"A": 1, "L": 1, "E": 4, "M": 2}).layout()
    assert (mixed.positions("A"), mixed.positions("L")) == ((1,), (5,))


def test_drift_fails_closed() -> None:
    drifted = Family("NAM56R-drift", "AEMEAEMEAEMR", 48, {"A": 13, "E": 22, "M": 13, "R": 4})
    with pytest.raises(
        FamilyError, match=r"drifted: .* counts \(A: declared 13, pattern gives 12; M: declared 13"
    ):
        drifted.layout()
    with pytest.raises(FamilyError, match="drifted"):
        FamilyRegistry().register(drifted)


def test_unknown_family_suggests_close_names() -> None:
    with pytest.raises(
        FamilyError, match=r"unknown family 'NAM56'; known: NAM56R, NAM52, NAM56R-MLA; did you mean 'NAM56R'"
    ):
        get_family("NAM56")


def test_duplicate_registration_refused() -> None:
    registry = FamilyRegistry(BUILTIN)
    with pytest.raises(FamilyError, match="already registered"):
        registry.register(BUILTIN[0])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "families.toml"
    path.write_text(text)
    return path


def test_user_families_from_toml(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[family.TINY]
pattern = "AEM|MEA"
depth = 6
counts = { A = 2, E = 2, M = 2 }
description = "two stages"

[family.GATED]
pattern = "AG"
depth = 4
counts = { A = 2, G = 2 }
letters = { G = "gated delta net" }
""",
    )
    registry = FamilyRegistry(BUILTIN)
    loaded = registry.load_toml(path)
    assert [f.name for f in loaded] == ["TINY", "GATED"]
    assert registry.get("TINY").layout().segments == ((0, 3), (3, 6))
    assert registry.get("GATED").layout().positions("G") == (2, 4)


_GOOD = 'pattern = "AE"\ndepth = 4\ncounts = {A=2, E=2}\n'


@pytest.mark.parametrize(
    ("body", "located"),
    [
        ('[family.X]\npattern = "AE"\ndepth = 4\n', "[family.X]: missing key(s) ['counts']"),
        (f"[family.X]\n{_GOOD}colour = 1\n", "[family.X]: unknown key(s) ['colour']"),
        (
            '[family.X]\npattern = "AE"\ndepth = "4"\ncounts = {A=2, E=2}\n',
            "[family.X] depth: must be an integer, got '4'",
        ),
        (
            '[family.X]\npattern = "AE"\ndepth = 0\ncounts = {A=2, E=2}\n',
            "[family.X] depth: depth must be between 1 and 1,000,000 layers, got 0",
        ),
        ("[family.X]\npattern = 5\ndepth = 4\ncounts = {A=2, E=2}\n", "[family.X] pattern: must be a string"),
        (
            '[family.X]\npattern = "AEq"\ndepth = 4\ncounts = {A=2, E=2}\n',
            "[family.X] pattern: invalid pattern: 'q' at position 2",
        ),
        (
            '[family.X]\npattern = "AE"\ndepth = 4\ncounts = {A=2, Q=2}\n',
            "[family.X] counts: name unknown letter(s) ['Q']",
        ),
        (
            '[family.X]\npattern = "AE"\ndepth = 4\ncounts = {A=2, E=-1}\n',
            "[family.X] counts: must map letters to non-negative",
        ),
        (
            '[family.X]\npattern = "AE"\ndepth = 4\ncounts = 3\n',
            "[family.X] counts: must map letters to non-negative",
        ),
        (
            '[family.X]\npattern = "AE"\ndepth = 4\ncounts = {A=3, E=1}\n',
            "[family.X] counts: family 'X' drifted",
        ),
        (f"[family.X]\n{_GOOD}description = 3\n", "[family.X] description: must be a string, got 3"),
        (f'[family.X]\n{_GOOD}letters = "G"\n', "[family.X] letters: must map letters to block names"),
        (f'[family.X]\n{_GOOD}letters = {{A = "x"}}\n', "[family.X] letters: 'A' must be one uppercase"),
        (f"[family.X]\n{_GOOD}letters = {{G = 1}}\n", "[family.X] letters: 'G' needs a block name"),
        ('[family."two words"]\npattern = "A"\ndepth = 1\ncounts = {A=1}\n', "[family.two words] name: "),
        ("[family]\nX = 3\n", "[family.X] must be a table, got 3"),
        ("[family.X\n", "not valid TOML"),
        ("title = 'no families'\n", "no [family.NAME] tables"),
    ],
)
def test_bad_toml_names_file_table_and_key(tmp_path: Path, body: str, located: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(FamilyError) as info:
        load_families(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert located in message, message


def test_family_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "families.toml"
    path.write_bytes(b"\xff\xfe[family.X]")
    with pytest.raises(FamilyError, match=r"not UTF-8 text \(byte 0\)") as info:
        load_families(path)
    assert str(info.value).startswith(f"{path}: ")


def test_duplicate_name_in_file_names_file_and_table(tmp_path: Path) -> None:
    path = _write(tmp_path, '[family.NAM52]\npattern = "AE"\ndepth = 4\ncounts = {A=2, E=2}\n')
    with pytest.raises(FamilyError, match=r"\[family.NAM52\]: family 'NAM52' is already registered") as info:
        FamilyRegistry(BUILTIN).load_toml(path)
    assert str(info.value).startswith(f"{path}: ") and info.value.key == "name"


def test_bad_family_in_file_registers_nothing(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[family.GOOD]\npattern = "AE"\ndepth = 4\ncounts = {A=2, E=2}\n'
        '[family.BAD]\npattern = "AE"\ndepth = 4\ncounts = {A=3, E=1}\n',
    )
    registry = FamilyRegistry(BUILTIN)
    with pytest.raises(FamilyError, match="BAD"):
        registry.load_toml(path)
    assert "GOOD" not in registry


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FamilyError, match="cannot read family file"):
        load_families(tmp_path / "absent.toml")

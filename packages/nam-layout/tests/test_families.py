from pathlib import Path

import pytest

from nam_layout import BUILTIN, Family, FamilyError, FamilyRegistry, get_family, load_families


def test_builtin_families_match_design_table() -> None:
    nam56r, nam52 = get_family("NAM56R"), get_family("NAM52")
    assert (nam56r.pattern, nam56r.depth) == ("AEMEAEMEAEMR", 52)
    assert dict(nam56r.layout().counts) == {"A": 13, "M": 13, "E": 22, "R": 4, "-": 0}
    assert (nam52.pattern, nam52.depth) == ("AEME", 52)
    assert dict(nam52.layout().counts) == {"A": 13, "M": 13, "E": 26, "R": 0, "-": 0}


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
        FamilyError, match=r"unknown family 'NAM56'; known: NAM56R, NAM52; did you mean 'NAM56R'"
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


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[family.X]\npattern = "AE"\ndepth = 4\n', r"missing key\(s\) \['counts'\]"),
        (
            '[family.X]\npattern = "AE"\ndepth = 4\ncounts = {A=2, E=2}\ncolour = 1\n',
            r"unknown key\(s\) \['colour'\]",
        ),
        ('[family.X]\npattern = "AE"\ndepth = "4"\ncounts = {A=2, E=2}\n', "depth must be an integer"),
        ('[family.X]\npattern = "AE"\ndepth = 4\ncounts = {A=2, Q=2}\n', r"unknown letter\(s\) \['Q'\]"),
        ('[family.X]\npattern = "AE"\ndepth = 4\ncounts = {A=2, E=-1}\n', "non-negative integers"),
        ('[family.X]\npattern = "AE"\ndepth = 4\ncounts = {A=2}\nletters = {A = "x"}\n', "extra letter 'A'"),
        ("[family.X\n", "not valid TOML"),
        ("title = 'no families'\n", r"no \[family.NAME\] tables"),
    ],
)
def test_bad_toml_is_rejected_with_location(tmp_path: Path, body: str, message: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(FamilyError, match=message) as info:
        load_families(path)
    assert str(path) in str(info.value)


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

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nam_layout.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own exits: usage errors and --help
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# each command with what it needs beyond a source (PATTERN --depth N or --family NAME); None: no source
COMMANDS: dict[str, list[str] | None] = {
    "validate": [],
    "show": ["--stages", "2"],
    "split": ["--stages", "2"],
    "translate": ["--to", "megatron"],
    "families": None,
}


def _argv(command: str, source: list[str]) -> list[str]:
    rest = COMMANDS[command]
    return [command] if rest is None else [command, *source, *rest]


def test_validate_json_reports_nam56r_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "AEMEAEMEAEMR", "--depth", "52", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True
    assert data["layout"]["counts"] == {"A": 13, "E": 22, "M": 13, "R": 4, "-": 0, "L": 0}
    assert data["layout"]["positions"]["R"] == [12, 24, 36, 48]


def test_validate_family_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "--family", "NAM52")
    assert code == 0 and out.startswith("valid: NAM52: 'AEME' at depth 52: A 13, M 13, E 26")


def test_invalid_pattern_exits_2_with_caret(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", "AEMaEM", "--depth", "12")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert "lowercase 'a' at position 3" in lines[0]
    assert lines[1] == "  AEMaEM" and lines[2] == "     ^"
    assert lines[3].startswith("accepted: A (attention)")


def test_invalid_pattern_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "AEQ", "--depth", "3", "--json")
    data = json.loads(out)
    assert code == 2 and data["ok"] is False and data["error"] == "pattern" and data["position"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["validate", "AEME"], "needs --depth N"),
        (["validate"], "give a PATTERN with --depth N, or --family NAME"),
        (["validate", "AEME", "--depth", "0"], "depth must be between 1 and 1,000,000 layers, got 0"),
        (["validate", "AEME", "--depth", "4", "--family", "NAM52"], "not both"),
        (["validate", "--family", "NOPE"], "unknown family 'NOPE'"),
        (["split", "AEME", "--depth", "4", "--stages", "5"], "would leave a stage empty"),
        (["split", "AEME", "--depth", "4", "--stages", "2", "--cost", "A"], "--cost 'A': no '='"),
        (["split", "AEME", "--depth", "4", "--stages", "0"], "stages must be a positive integer, got 0"),
        (["split", "AEME", "--depth", "4", "--stages", "2", "--virtual", "0"], "virtual must be a positive"),
        (
            ["split", "AEME", "--depth", "4", "--stages", "2", "--output-cost", "-5"],
            "output cost must be a finite",
        ),
        (
            ["split", "AEME", "--depth", "4", "--stages", "2", "--embedding-cost", "nan"],
            "embedding cost must be",
        ),
        (
            ["translate", "AEME", "--depth", "4", "--to", "megatron", "--map", "e=M"],
            "cannot map 'e': not a layer",
        ),
        (
            ["translate", "--family", "NAM56R", "--to", "megatron"],
            "R (M2RNN recurrent) has no megatron-core block",
        ),
        (["translate", "--family", "NAM56R", "--to", "megatron", "--map", "RM"], "expected LETTER=SYMBOL"),
    ],
)
def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err


def test_show_has_table_and_strip(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "show", "--family", "NAM56R", "--stages", "2")
    assert code == 0
    strip = next(line for line in out.splitlines() if line.strip().startswith("strip"))
    assert strip.count("|") == 1
    assert strip.replace("strip", "").replace(" ", "").replace("|", "") == "AEMEAEMEAEMR" * 4 + "AEME"
    assert "R      M2RNN recurrent          4  12, 24, ..., 48 (every 12)" in out
    assert "A      attention               13  1, 5, ..., 49 (every 4)" in out
    table = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in table] == [str(i) for i in range(1, 53)]
    assert "imbalance" in out


def test_split_and_translate_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "split", "--family", "NAM52", "--stages", "4", "--json")
    plan = json.loads(out)["plan"]
    assert code == 0 and [c["rank"] for c in plan["chunks"]] == [0, 1, 2, 3]
    assert sum(c["stop"] - c["start"] for c in plan["chunks"]) == 52
    code, out, _ = run(
        capsys, "translate", "--family", "NAM56R", "--to", "megatron", "--map", "R=M", "--stages", "2"
    )
    assert code == 0
    assert out.strip().count("|") == 1 and out.strip().replace("|", "") == "*EME*EME*EMM" * 4 + "*EME"


def test_families_lists_builtins_and_user_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[family.MINE]\npattern = "A-"\ndepth = 6\ncounts = { A = 3, "-" = 3 }\n')
    code, out, _ = run(capsys, "families", "--families", str(path), "--json")
    names = [f["name"] for f in json.loads(out)["families"]]
    assert code == 0 and names == ["NAM56R", "NAM52", "NAM56R-MLA", "MINE"]
    code, out, _ = run(capsys, "validate", "--family", "MINE", "--families", str(path))
    assert code == 0 and "A 3" in out and "- 3" in out


def test_console_script_and_import_footprint() -> None:
    """The installed entry point runs, and importing the CLI loads only the standard library (what
    keeps the import at ~37 ms here; a wall-clock bound would make this test flaky under load)."""
    done = subprocess.run(
        [sys.executable, "-m", "nam_layout.cli", "validate", "AEMEAEMEAEMR", "--depth", "52", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layout"]["counts"]["R"] == 4
    probe = "import sys; before = set(sys.modules); import nam_layout.cli; print(*set(sys.modules) - before)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    foreign = [
        m
        for m in loaded.stdout.split()
        if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "nam_layout"
    ]
    assert "nam_layout.cli" in loaded.stdout.split() and foreign == []


@pytest.mark.parametrize("command", COMMANDS)
def test_shared_options_before_or_after_the_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    argv = _argv(command, ["AEME", "--depth", "4"])
    for shared in (["--json", *argv], [*argv, "--json"]):
        code, out, err = run(capsys, *shared)
        assert code == 0 and json.loads(out)["ok"] is True, (shared, err)
    mine, yours = tmp_path / "mine.toml", tmp_path / "yours.toml"
    mine.write_text('[family.MINE]\npattern = "AE"\ndepth = 4\ncounts = { A = 2, E = 2 }\n')
    yours.write_text('[family.YOURS]\npattern = "AE"\ndepth = 2\ncounts = { A = 1, E = 1 }\n')
    # a family file before the command and another after it: both register
    argv = _argv(command, ["--family", "MINE"])
    code, out, err = run(capsys, "--families", str(mine), *argv, "--families", str(yours), "--json")
    assert code == 0, err
    if command == "families":
        assert [f["name"] for f in json.loads(out)["families"]][-2:] == ["MINE", "YOURS"]
    else:
        assert json.loads(out)["family"] == "MINE"
    code, _, err = run(capsys, "--families", str(tmp_path / "absent.toml"), *argv)
    assert code == 2 and "absent.toml" in err


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_lists_shared_options_once(capsys: pytest.CaptureFixture[str], command: str | None) -> None:
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert "options of every command (before or after the command name):" in out
    for option in ("--json ", "--families TOML "):
        described = [line for line in out.splitlines() if line.strip().startswith(option)]
        assert len(described) == 1, (option, out)


@pytest.mark.parametrize(
    ("cost", "problem"),
    [
        ("X=1", "unknown letter 'X'"),
        ("a=1", "unknown letter 'a'"),
        ("=1", "unknown letter ''"),
        ("M", "no '='"),
        ("M=fast", "'fast' is not a finite number >= 0"),
        ("M=", "'' is not a finite number >= 0"),
        ("M=-1", "'-1' is not a finite number >= 0"),
        ("M=inf", "'inf' is not a finite number >= 0"),
        ("M=nan", "'nan' is not a finite number >= 0"),
    ],
)
def test_bad_cost_names_letter_and_accepted_letters(
    capsys: pytest.CaptureFixture[str], cost: str, problem: str
) -> None:
    accepted = "expected LETTER=W, LETTER one of A M E R - L and W a number >= 0, e.g. M=1.8"
    for command in ("show", "split", "translate"):
        code, out, err = run(capsys, *_argv(command, ["AEME", "--depth", "4"]), "--cost", cost)
        assert code == 2 and out == "", command
        assert err == f"nam-layout {command}: --cost {cost!r}: {problem}; {accepted}\n"


def test_cost_of_a_family_letter(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "gated.toml"
    path.write_text(
        '[family.GATED]\npattern = "AG"\ndepth = 4\ncounts = { A = 2, G = 2 }\nletters = { G = "gdn" }\n'
    )
    code, out, err = run(
        capsys,
        "--families",
        str(path),
        "split",
        "--family",
        "GATED",
        "--stages",
        "2",
        "--cost",
        "G=3",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["plan"]["rank_costs"] == [4.0, 4.0]
    code, _, err = run(
        capsys, "--families", str(path), "split", "--family", "GATED", "--stages", "2", "--cost", "Q=3"
    )
    assert code == 2 and "LETTER one of A M E R - L G" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["validate", "AEME", "--depth", "x"], "argument --depth: invalid int value: 'x'"),
        (["split", "AEME", "--depth", "4"], "the following arguments are required: --stages"),
        (["validate", "AEME", "--depth", "4", "--colour"], "unrecognized arguments: --colour"),
        (["explain"], "invalid choice: 'explain'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err and "--help" in err, err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe[family.X]", "not UTF-8 text"),
        (
            b'[family.X]\npattern = "AE"\ndepth = 4\ncounts = {A=2, E=2}\nletters = "G"\n',
            "[family.X] letters:",
        ),
    ],
)
def test_bad_family_file_is_an_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "f.toml"
    path.write_bytes(content)
    code, _, err = run(capsys, "families", "--families", str(path))
    assert code == 2 and err.startswith(f"nam-layout families: {path}: ") and message in err


def test_a_huge_depth_is_one_line_naming_the_limit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """10**11 layers would be a 100 GB string (a MemoryError traceback before the bound)."""
    code, out, err = run(capsys, "validate", "AEM", "--depth", str(10**11))
    assert code == 2 and out == ""
    assert err == "nam-layout validate: depth must be between 1 and 1,000,000 layers, got 100,000,000,000\n"
    path = tmp_path / "f.toml"
    path.write_text(f'[family.BIG]\npattern = "AEM"\ndepth = {10**11}\ncounts = {{A = 1}}\n')
    code, _, err = run(capsys, "families", "--families", str(path))
    assert code == 2 and len(err.splitlines()) == 1 and "between 1 and 1,000,000 layers" in err


def test_a_closed_stdout_ends_quietly_with_141() -> None:
    """``nam-layout families | head -1``: the reader is gone before we print."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nam_layout.cli", "families"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_ctrl_c_is_one_line_and_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("nam_layout.cli._validate", interrupted)
    code, _, err = run(capsys, "validate", "AEM", "--depth", "3")
    assert (code, err) == (130, "nam-layout: interrupted\n")

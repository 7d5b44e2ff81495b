import json
import subprocess
import sys
from pathlib import Path

import pytest

from nam_layout.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_json_reports_nam56r_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "AEMEAEMEAEMR", "--depth", "52", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True
    assert data["layout"]["counts"] == {"A": 13, "E": 22, "M": 13, "R": 4, "-": 0}
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
        (["validate", "AEME", "--depth", "0"], "depth must be at least 1"),
        (["validate", "AEME", "--depth", "4", "--family", "NAM52"], "not both"),
        (["validate", "--family", "NOPE"], "unknown family 'NOPE'"),
        (["split", "AEME", "--depth", "4", "--stages", "5"], "would leave a stage empty"),
        (["split", "AEME", "--depth", "4", "--stages", "2", "--cost", "A"], "expected LETTER=NUMBER"),
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
    assert code == 0 and names == ["NAM56R", "NAM52", "MINE"]
    code, out, _ = run(capsys, "validate", "--family", "MINE", "--families", str(path))
    assert code == 0 and "A 3" in out and "- 3" in out


def test_console_script_and_import_time() -> None:
    """The installed entry point runs, and importing the package stays far under 100 ms."""
    done = subprocess.run(
        [sys.executable, "-m", "nam_layout.cli", "validate", "AEMEAEMEAEMR", "--depth", "52", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layout"]["counts"]["R"] == 4
    probe = "import time; t = time.perf_counter(); import nam_layout.cli; print(time.perf_counter() - t)"
    seconds = min(
        float(
            subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        )
        for _ in range(3)
    )
    assert seconds < 0.1

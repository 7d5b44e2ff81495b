import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nam_spec.cli import main


def test_plan_full_nam56r_from_the_formula(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "NAM56R" and out["preset"] == "nam56r"
    assert out["total"] == out["formula_total"] == 5_574_492_448 + out["extra"]["embedding_extras"]
    assert out["extra"]["embedding_extras"] > 0  # the preset's n-gram and structure embeddings
    assert [row["letter"] for row in out["layers"][:12]] == list("AEMEAEMEAEMR")
    assert out["layers"][11]["core"] == "nam_spec.adapters.m2rnn.M2RNNAdapter"
    assert out["layers"][0]["core"] == "nam_spec.local.attention.SDPAttention"
    assert out["layers"][1]["core"] == "nam_spec.local.experts.GroupedExperts"


def test_plan_on_the_meta_device_counts_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "NAM56R", "--preset", "nam56r-small", "--meta", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == out["formula_total"]
    assert out["layers"][11]["core"] == "nam_mixers.modules.m2rnn.M2RNNCore"


def test_plan_table_and_te_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "NAM52", "--backend", "te"]) == 0
    out = capsys.readouterr().out
    assert "NAM52 with preset nam56r (te backend): 52 layers" in out and "TEGroupedMLP" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "NAM99"], "NAM99"),
        (["plan", "NAM56R", "--preset", "huge"], "no preset 'huge'"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_family_of_huge_depth_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A families file with depth 10**11 was a MemoryError traceback."""
    path = tmp_path / "big.toml"
    path.write_text(f'[family.BIG]\npattern = "AEM"\ndepth = {10**11}\ncounts = {{A = 1}}\n')
    assert main(["plan", "BIG", "--families", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "depth must be between 1 and 1,000,000 layers" in err


def test_plan_says_nothing_of_the_libraries_on_stderr() -> None:
    """No TE/Apex fall-back notices, no megatron SyntaxWarning, no 'No CUDA runtime'."""
    # a world of its own: not the rendezvous port an in-process --meta plan left in this environment
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env |= {"CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}  # compiled: SyntaxWarnings are said
    done = subprocess.run(
        [sys.executable, "-m", "nam_spec.cli", "plan", "--meta"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")

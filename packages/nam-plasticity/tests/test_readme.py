import re
from pathlib import Path


def test_readme_example_runs(capsys) -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "3 fire mlp.linear_fc1.weight" in out and "redo/dormant_fraction/mlp" in out

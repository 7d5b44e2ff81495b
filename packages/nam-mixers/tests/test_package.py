import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import nam_mixers
from nam_mixers.ops.m2rnn import M2RNNKernelConfig, PassConfig


def test_installed_version_matches_module() -> None:
    assert nam_mixers.__version__ == version("nam-mixers")


README = Path(__file__).parents[1] / "README.md"
PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_readme_names_only_extras_the_package_declares() -> None:
    declared = set(tomllib.loads(PYPROJECT.read_text())["project"].get("optional-dependencies", {}))
    text = README.read_text()
    named = set(re.findall(r"nam-mixers\[(\w+)\]", text)) | set(re.findall(r"the `(\w+)` extra", text))
    assert named <= declared, (
        f"README names extras {sorted(named - declared)}; pyproject declares {sorted(declared)}"
    )


def test_readme_default_precision_table_matches_config() -> None:
    """The README's table of what precision=None and fast_tanh=None pick, rebuilt from PassConfig."""
    default = PassConfig()

    def cell(fp32: bool, on_cuda: bool) -> str:
        tanh = "tanh.approx" if default.use_fast_tanh(fp32, on_cuda) else "exact tanh"
        return f'"{default.dot_precision(fp32, on_cuda)}" dot, {tanh}'

    text = README.read_text()
    for inputs, fp32 in (("float32", True), ("bfloat16 / float16", False)):
        assert f"| {inputs} | {cell(fp32, True)} | {cell(fp32, False)} |" in text, inputs


def test_readme_states_the_pinned_block_sizes() -> None:
    cfg = M2RNNKernelConfig()
    assert (
        f"the defaults are `block_t` {cfg.forward.block_t} forward and {cfg.backward.block_t} backward"
        in (" ".join(README.read_text().split()))
    )

"""``[model]`` is nam-spec's ModelConfig, field for field: the one model schema of the project.

A trainer preset names a nam-spec model preset and adds no geometry of its own; every nam-spec
field can be set from TOML and from the command line; ``nam-spec plan`` and ``--dry-run`` print
the same layer table and parameter total for every preset.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

import nam_spec
from nam_spec.cli import main as nam_spec_main
from nam_trainer.cli import main as nam_train_main
from nam_trainer.config import PRESETS, ConfigError, check, load_config, preset_text
from nam_trainer.config.loader import _toml_literal
from nam_trainer.config.schema import SECTIONS


def test_model_section_is_nam_specs_config_and_parallel_extends_its_parallel_config() -> None:
    assert SECTIONS["model"] is nam_spec.ModelConfig
    assert issubclass(SECTIONS["parallel"], nam_spec.ParallelConfig)
    trainer_only = {f.name for f in dataclasses.fields(SECTIONS["parallel"])} - {
        f.name for f in dataclasses.fields(nam_spec.ParallelConfig)
    }
    assert trainer_only == {"data", "distributed_optimizer"}
    # no other section redefines a model concept
    model_words = re.compile(r"hidden|heads|experts|vocab|seq_length|precision|recompute|ngram|d_state")
    for name, cls in SECTIONS.items():
        if name not in ("model", "parallel"):
            assert not [f.name for f in dataclasses.fields(cls) if model_words.search(f.name)], name


@pytest.mark.parametrize("name", PRESETS)
def test_trainer_presets_name_a_model_preset_and_add_no_geometry(name: str) -> None:
    model_table = tomllib.loads(preset_text(name))["model"]
    assert model_table == {"preset": name}
    assert load_config(name).model == nam_spec.PRESETS[name]


def _leaves(cls: Any, prefix: str) -> list[tuple[str, Any]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name]))
    return out


def _other_value(key: str, current: Any) -> tuple[str, Any]:
    """A valid different value for ``key`` as command-line text, and its parsed form."""
    special = {
        "model.family": ("NAM52", "NAM52"),
        "model.families_file": ("fam.toml", "fam.toml"),
        "model.backend": ("te", "te"),
        "model.params_dtype": ("bfloat16", "bfloat16"),
        "model.recompute": ('{A = "full", "-" = "selective"}', {"A": "full", "-": "selective"}),
        "model.moe.score_function": ("softmax", "softmax"),
        "model.moe.load_balancing": ("seq_aux_loss", "seq_aux_loss"),
        "model.moe.dispatcher": ("allgather", "allgather"),
        "model.mamba.path": ("split", "split"),
        "model.mamba.kind": ("mamba3", "mamba3"),
        "model.m2rnn.path": ("triton", "triton"),
        "model.embedding.ngram_orders": ("[2, 4]", (2, 4)),
        "model.cuda_graphs": ("MR", "MR"),
    }
    if key in special:
        return special[key]
    if isinstance(current, bool):
        return ("false" if current else "true", not current)
    if isinstance(current, int):
        return (str(current * 2), current * 2)
    if isinstance(current, float):
        return (repr(current * 2), current * 2)
    raise AssertionError(f"no test value for {key} = {current!r}")


def test_every_nam_spec_field_is_settable_from_the_command_line_and_toml(tmp_path: Path) -> None:
    base = load_config("nam56r-tiny").model
    leaves = _leaves(nam_spec.ModelConfig, "model.")
    assert len(leaves) > 40
    for key, _type in leaves:
        current = base
        for part in key.split(".")[1:]:
            current = getattr(current, part)
        text, value = _other_value(key, current)
        got = load_config("nam56r-tiny", overrides=[f"--{key}", text]).model
        for part in key.split(".")[1:]:
            got = getattr(got, part)
        assert got == value, key
        section, _, leaf = key.rpartition(".")
        f = tmp_path / "one.toml"
        f.write_text(f"[{section}]\n{leaf} = {_toml_literal(value)}\n")
        from_file = load_config("nam56r-tiny", [f]).model
        for part in key.split(".")[1:]:
            from_file = getattr(from_file, part)
        assert from_file == value, key


def test_nested_tables_merge_over_the_model_preset(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('[model]\npreset = "nam56r-small"\n[model.moe]\ntop_k = 2\n')
    cfg = load_config("nam56r-tiny", [f], ["--model.mamba.chunk_size", "64"])
    small = nam_spec.PRESETS["nam56r-small"]
    assert cfg.model.moe == dataclasses.replace(small.moe, top_k=2)
    assert cfg.model.mamba.chunk_size == 64 and cfg.model.hidden_size == small.hidden_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.moe.topk", "4"], "unknown key model.moe.topk (did you mean 'top_k'?)"),
        (["--model.moe.score_function", "relu"], "model.moe.score_function = 'relu': accepted values are"),
        (["--model.preset", "nam99"], "model.preset = 'nam99' (set by the command line): no such nam-spec"),
        (["--model.hidden_size.x", "1"], "model.hidden_size is a value, not a table"),
        (["--model.recompute", "{A = 1}"], "model.recompute = {'A': 1}"),
    ],
)
def test_bad_model_keys_name_the_key_and_what_is_accepted(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("nam56r-tiny", overrides=overrides)
    assert message in str(err.value)


def test_model_and_trainer_problems_are_reported_together() -> None:
    cfg = load_config(
        "nam56r-tiny",
        overrides=[
            "--model.moe.top_k",
            "9",
            "--model.hidden_size",
            "130",
            "--training.global_batch_size",
            "6",
        ],
    )
    with pytest.raises(ConfigError) as err:
        check(cfg, world_size=1)
    message = str(err.value)
    for part in ("model.moe.top_k 9", "model.hidden_size 130", "training.global_batch_size = 6"):
        assert part in message


def _table_and_total(text: str) -> tuple[list[str], int]:
    rows = [line.strip() for line in text.splitlines() if re.match(r"^\s+\d+  \S ", line)]
    total = re.search(r"^\s+total\s+([\d,]+)", text, re.M)
    assert rows and total, text
    return rows, int(total.group(1).replace(",", ""))


@pytest.mark.parametrize("name", PRESETS)
def test_nam_spec_plan_and_dry_run_print_the_same_table_and_total(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert nam_spec_main(["plan", "--preset", name]) == 0
    plan = _table_and_total(capsys.readouterr().out)
    assert nam_train_main(["--dry-run", "--preset", name, "--data.cache_dir", str(tmp_path)]) == 0
    dry = _table_and_total(capsys.readouterr().out)
    assert plan == dry
    assert len(plan[0]) == 52


def test_te_backend_only_when_asked_and_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_config("nam56r-tiny").model.backend == "local"
    argv = ["--dry-run", "--model.backend", "te", "--data.document_masking", "false"]
    argv += ["--data.cache_dir", str(tmp_path)]
    assert nam_train_main(argv) == 0
    out = capsys.readouterr().out
    assert "te backend classes" in out and "warning: model.backend = 'te': the Transformer Engine" in out

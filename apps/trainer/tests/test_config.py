from __future__ import annotations

from pathlib import Path

import pytest

from nam_trainer.config import PRESETS, ConfigError, check, load_config, parse_overrides, to_toml

# cppmega-nam56r is the same depth with its attention layers multi-latent (L, an A variant)
PATTERNS = {"cppmega-nam56r": "LEMELEMELEMR"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_the_nam56r_pattern_at_depth_52(preset: str) -> None:
    checked = check(load_config(preset), world_size=1)
    pattern = PATTERNS.get(preset, "AEMEAEMEAEMR")
    attention = pattern[0]
    assert checked.layout.pattern == pattern
    assert checked.layout.depth == 52
    assert {k: n for k, n in checked.layout.counts.items() if n} == {attention: 13, "E": 22, "M": 13, "R": 4}
    assert checked.layout.positions("R") == (12, 24, 36, 48)


def test_presets_carry_the_geometries_of_the_issue() -> None:
    full, small, tiny = (load_config(p).model for p in ("nam56r", "nam56r-small", "nam56r-tiny"))
    assert (full.hidden_size, full.attention.num_heads, full.attention.num_kv_heads) == (3584, 56, 8)
    assert full.head_dim == 64 and full.vocab_size == 65536 and full.seq_length == 4096
    assert (full.moe.num_experts, full.moe.top_k, full.moe.ffn_hidden_size) == (16, 4, 896)
    assert full.moe.shared_ffn_hidden_size == 1024 and full.moe.score_function == "sigmoid"
    assert (full.mamba.d_state, full.mamba.head_dim, full.mamba.ngroups, full.mamba.expand) == (64, 64, 8, 2)
    assert (full.m2rnn.num_heads, full.m2rnn.head_dim_v, full.m2rnn.head_dim_k) == (44, 16, 64)
    assert small.hidden_size == 2048 and small.params_dtype == "bfloat16" and small.recompute == "selective"
    assert tiny.hidden_size == 128 and (tiny.moe.num_experts, tiny.moe.top_k) == (4, 2)
    assert tiny.vocab_size == 4096 and tiny.seq_length == 256 and tiny.params_dtype == "float32"


def test_layers_apply_in_order_preset_file_command_line(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('[training]\nsteps = 7\nlr = 1e-3\n[data]\nsources = ["a", "b"]\n')
    cfg = load_config("nam56r-tiny", [f], ["--training.steps", "9", "--data.cache_dir=/x y"])
    assert cfg.training.steps == 9  # the command line wins over the file
    assert cfg.training.lr == 1e-3  # the file wins over the preset
    assert cfg.model.hidden_size == 128  # the preset wins over the defaults
    assert [s.path for s in cfg.data.sources] == ["a", "b"] and cfg.data.cache_dir == "/x y"


@pytest.mark.parametrize("preset", PRESETS)
def test_resolved_toml_reproduces_the_config_whatever_the_preset(preset: str, tmp_path: Path) -> None:
    cfg = load_config(
        preset,
        overrides=[
            *("--data.sources", '["q \\"x\\"", "*.h"]', "--training.min_lr", "1e-5"),
            *("--model.recompute", '{E = "full", "-" = "selective"}', "--model.moe.top_k", "1"),
        ],
    )
    f = tmp_path / "resolved.toml"
    f.write_text(to_toml(cfg))
    assert "[model.moe]" in f.read_text()
    other = "nam56r" if preset != "nam56r" else "nam56r-tiny"
    assert load_config(other, [f]) == cfg


def test_overrides_are_parsed_by_field_type() -> None:
    parsed = parse_overrides(
        [
            "--tokenizer.path",
            "123",
            "--training.steps=5",
            "--parallel.sequence_parallel",
            "true",
            "--data.sources",
            "x",
        ]
    )
    assert parsed == {
        "tokenizer": {"path": "123"},
        "training": {"steps": 5},
        "parallel": {"sequence_parallel": True},
        "data": {"sources": ["x"]},
    }


def test_fused_adam_is_on_by_default_and_set_by_the_command_line() -> None:
    assert load_config("nam56r-tiny").training.fused_adam is True
    cfg = load_config("nam56r-tiny", overrides=["--training.fused_adam", "false"])
    assert cfg.training.fused_adam is False and "fused_adam = false" in to_toml(cfg)
    with pytest.raises(ConfigError, match=r"training\.fused_adam = 1: expected true or false"):
        load_config("nam56r-tiny", overrides=["--training.fused_adam", "1"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--trainig.steps", "3"], "unknown section [trainig] (did you mean 'training'?)"),
        (["--training.step", "3"], "unknown key training.step (did you mean 'steps'?)"),
        (["--training.steps", "many"], "--training.steps 'many': not a value"),
        (["--training.steps", "2.5"], "training.steps = 2.5: expected an integer (set by the command line)"),
        (["--training.steps", "0"], "training.steps = 0: must be >= 1 (set by the command line)"),
        (["--model.moe.score_function", "relu"], "accepted values are 'softmax', 'sigmoid'"),
        (["--data.validation_fraction", "1.0"], "data.validation_fraction = 1.0: must be in [0, 1)"),
        (
            ["--training.lr", "1e-5"],
            "training.min_lr = 0.0003: must be <= training.lr = 1e-05 (set by preset",
        ),
        (["--training.steps"], "missing its value"),
        (["steps=3"], "expected --section.key VALUE"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_what_is_accepted(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("nam56r-tiny", overrides=overrides)
    assert message in str(err.value)


def test_bad_config_files_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nhiden_size = 3\n")
    with pytest.raises(
        ConfigError,
        match=r"config file '.*bad.toml': unknown key model.hiden_size \(did you mean 'hidden_size'\?\)",
    ):
        load_config(files=[f])
    f.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(files=[f])
    f.write_text("steps = 3\n")
    with pytest.raises(ConfigError, match="top-level key 'steps' is not a \\[section\\]"):
        load_config(files=[f])
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(files=[tmp_path / "missing.toml"])
    with pytest.raises(ConfigError, match="unknown preset 'nam99'"):
        load_config("nam99")


def test_incompatible_parallel_sizes_are_all_reported() -> None:
    cfg = load_config("nam56r", overrides=["--parallel.tensor", "8", "--parallel.expert", "3"])
    with pytest.raises(ConfigError) as err:
        check(cfg, world_size=12)
    text = str(err.value)
    assert "world size 12 is not divisible by parallel.tensor x parallel.pipeline = 8 x 1 = 8" in text
    assert "model.m2rnn.num_heads 44 is not divisible by parallel.tensor 8" in text
    assert "model.moe.num_experts 16 is not divisible by parallel.expert 3" in text
    assert "need parallel.sequence_parallel = true" in text


def test_parallel_sizes_that_fit_resolve_data_parallel() -> None:
    cfg = load_config(
        "nam56r",
        overrides=[
            "--parallel.tensor",
            "4",
            "--parallel.sequence_parallel",
            "true",
            "--parallel.pipeline",
            "2",
            "--parallel.expert",
            "2",
            "--model.m2rnn.num_heads",
            "48",
        ],
    )
    checked = check(cfg, world_size=16)
    assert (checked.sizes.tensor, checked.sizes.pipeline, checked.sizes.data, checked.sizes.expert) == (
        4,
        2,
        2,
        2,
    )
    assert len(checked.stages.chunks) == 2


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            ["--parallel.data", "2"],
            4,
            "parallel.tensor x pipeline x data = 1 x 1 x 2 = 2, but the world size is 4",
        ),
        (["--training.global_batch_size", "6"], 4, "training.global_batch_size = 6 is not divisible"),
        (["--parallel.pipeline", "53"], 53, "parallel.pipeline = 53"),
        (["--parallel.virtual_pipeline", "2"], 1, "needs parallel.pipeline > 1"),
        (["--model.attention.num_kv_heads", "3"], 1, "multiple of model.attention.num_kv_heads 3"),
        (["--model.moe.top_k", "5"], 1, "model.moe.top_k 5 must lie in 1..model.moe.num_experts (4)"),
        (["--data.structure", "none"], 1, "model.embedding.structure = true needs structure channels"),
        (["--model.backend", "te"], 1, "data.document_masking = true needs model.backend = 'local'"),
        (["--model.params_dtype", "float16"], 1, 'model.params_dtype = "float16": nam-train trains in'),
        (["--model.vocab_size", "100"], 1, "model.vocab_size = 100: the byte-level BPE"),
        (["--model.family", "NAM99"], 1, "model.family = 'NAM99'"),
    ],
)
def test_cross_field_problems(overrides: list[str], world: int, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check(load_config("nam56r-tiny", overrides=overrides), world_size=world)
    assert message in str(err.value)


def test_families_file_adds_a_family(tmp_path: Path) -> None:
    f = tmp_path / "families.toml"
    f.write_text('[family.SMALL]\npattern = "AEME"\ndepth = 8\ncounts = { A = 2, E = 4, M = 2 }\n')
    cfg = load_config(overrides=["--model.family", "SMALL", "--model.families_file", str(f)])
    assert check(cfg, 1).layout.depth == 8

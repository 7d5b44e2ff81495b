"""The trainer config -> nam-spec config mapping that training, dry run and benchmark share."""

from __future__ import annotations

import pytest

from nam_trainer.config import ConfigError, load_config
from nam_trainer.model_config import model_setup, resolved_precision


def test_tiny_preset_maps_every_section() -> None:
    cfg = load_config(
        "nam56r-tiny", overrides=["--training.recompute", "selective", "--parallel.tensor", "2"]
    )
    setup = model_setup(cfg, precision="fp32")
    c = setup.config
    assert (c.hidden_size, c.vocab_size, c.seq_length) == (128, cfg.tokenizer.vocab_size, 256)
    assert (c.attention.num_heads, c.attention.num_kv_heads, c.head_dim) == (4, 2, 32)
    assert (c.moe.num_experts, c.moe.top_k, c.moe.shared_ffn_hidden_size) == (4, 2, 128)
    assert (c.mamba.d_state, c.mamba.head_dim, c.m2rnn.num_heads, c.m2rnn.head_dim_k) == (16, 32, 4, 32)
    assert c.params_dtype == "float32" and c.tensor_parallel == 2
    assert c.recompute_for("A") == "selective"
    assert setup.layout.depth == 52 and set(setup.embedding) == {"ngram", "structure"}
    assert setup.embedding["ngram"].table_size == cfg.embedding.ngram_table_size


def test_structure_off_when_data_has_none() -> None:
    cfg = load_config("nam56r-tiny", overrides=["--data.structure", "none"])
    assert set(model_setup(cfg, precision="bf16").embedding) == {"ngram"}
    assert model_setup(cfg, precision="bf16").config.params_dtype == "bfloat16"


def test_head_dim_that_nam_spec_cannot_build_is_refused() -> None:
    cfg = load_config("nam56r-tiny", overrides=["--model.kv_channels", "16"])
    with pytest.raises(ConfigError, match=r"model.kv_channels = 16: .* = 32"):
        model_setup(cfg, precision="fp32")


def test_auto_precision() -> None:
    assert resolved_precision("auto", cuda=True) == "bf16"
    assert resolved_precision("auto", cuda=False) == "fp32"
    assert resolved_precision("bf16", cuda=False) == "bf16"

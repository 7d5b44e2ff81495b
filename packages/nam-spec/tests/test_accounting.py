"""The analytic formula against tensors actually built, per letter and for the full NAM56R on meta."""

import pytest
import torch
from helpers import MAMBA3, tiny

from nam_layout import Layout
from nam_spec.accounting import letter_params, model_flops_per_token, model_params
from nam_spec.config import AttentionConfig, EmbeddingConfig, ModelConfig, MoEConfig
from nam_spec.model import build_model
from nam_spec.presets import preset


@pytest.mark.parametrize(("letter", "changes"), [*((k, {}) for k in "AEMR-"), ("M", {"mamba": MAMBA3})])
def test_formula_equals_built_layer(letter: str, changes: dict, megatron_single_rank: None) -> None:
    config = tiny(**changes)
    model = build_model(Layout.tile(letter, 1), config)
    built = sum(p.numel() for p in model.decoder.layers[0].parameters())
    assert built == letter_params(config, letter).total


def test_full_nam56r_on_meta_device_matches_formula(megatron_single_rank: None) -> None:
    config = preset("nam56r", moe=MoEConfig(dispatcher="allgather"))
    layout = Layout.tile("AEMEAEMEAEMR", 52)
    with torch.device("meta"):
        model = build_model(layout, config)
    built = sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())
    formula = model_params(config, layout)
    assert built == formula.total
    assert formula.total - formula.embedding_extras == 5_574_492_448  # the layers, embedding and output
    extras = sum(p.numel() for p in model.embedding.extra_parameters())
    assert extras == formula.embedding_extras > 0


def test_formula_reproduces_megatrons_measured_hybrid_baseline() -> None:
    """GPU.md: megatron-core's own hybrid model, *EME*EME*EMM x 52 at hidden 3584 with 14 KV
    heads, counted 5.90 B parameters; the same geometry through our formula (R -> M)."""
    config = preset("nam56r").replace(
        attention=AttentionConfig(num_heads=56, num_kv_heads=14), embedding=EmbeddingConfig()
    )
    total = model_params(config, Layout.tile("AEMEAEMEAEMM", 52)).total
    assert round(total / 1e9, 2) == 5.90


def test_active_parameters_and_flops() -> None:
    config, layout = preset("nam56r"), Layout.tile("AEMEAEMEAEMR", 52)
    p = model_params(config, layout)
    e = letter_params(config, "E")
    routed = 16 * 3 * 896 * 3584
    assert e.total - e.active == routed * 3 // 4  # 12 of 16 experts idle per token
    assert p.matmul_active < p.active < p.total
    attention = 6 * 4096 * 56 * 64 * 13
    assert model_flops_per_token(config, layout) == 6 * p.matmul_active + attention


def test_tied_output_is_counted_once() -> None:
    layout = Layout.tile("A", 2)
    untied, tied = model_params(ModelConfig(), layout), model_params(ModelConfig(untie_output=False), layout)
    assert untied.total - tied.total == 65536 * 3584
    assert untied.matmul_active == tied.matmul_active  # the output matmul runs either way

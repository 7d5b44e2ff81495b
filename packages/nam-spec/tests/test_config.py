import pytest
from helpers import tiny

from nam_layout import Layout
from nam_spec.config import AttentionConfig, MambaConfig, MoEConfig, SpecConfigError, validate
from nam_spec.presets import PRESETS, preset

LAYOUT = Layout.tile("AEMEAEMEAEMR", 52)


@pytest.mark.parametrize(
    ("changes", "layout", "message"),
    [
        ({"hidden_size": 30}, LAYOUT, "hidden_size 30 is not divisible by num_heads 4"),
        ({"attention": AttentionConfig(num_heads=4, num_kv_heads=3)}, LAYOUT, "multiple of num_kv_heads 3"),
        (
            {"tensor_parallel": 8, "sequence_parallel": True},
            LAYOUT,
            "num_heads 4 is not divisible by tensor_parallel 8",
        ),
        ({"moe": MoEConfig(num_experts=0)}, LAYOUT, "E needs at least one expert"),
        ({"moe": MoEConfig(num_experts=4, top_k=5)}, LAYOUT, "top_k 5 must lie in 1..num_experts (4)"),
        ({"tensor_parallel": 2}, LAYOUT, "need sequence_parallel=True"),
        (
            {"tensor_parallel": 2},
            Layout.tile("AMR", 3),
            "R layers with tensor_parallel > 1 need sequence_parallel",
        ),
        ({"backend": "cuda"}, LAYOUT, "backend 'cuda' is unknown"),
        ({"recompute": {"A": "most"}}, LAYOUT, "recompute['A'] = 'most'"),
        ({"hidden_size": 0}, LAYOUT, "hidden_size must be a positive integer"),
    ],
)
def test_bad_configs_fail_with_what_and_where(changes: dict, layout: Layout, message: str) -> None:
    with pytest.raises(SpecConfigError) as e:
        validate(tiny(**changes), layout)
    assert message in str(e.value)


def test_unknown_letter_is_named() -> None:
    layout = Layout.tile("AG", 4, {"A": "attention", "G": "gated delta net"})
    with pytest.raises(SpecConfigError, match=r"\['G'\] have no nam-spec block; nam-spec builds A E M R -"):
        validate(tiny(), layout)


def test_only_letters_present_are_checked() -> None:
    # heads that do not divide the width do not matter to a model without attention
    validate(tiny(hidden_size=30, mamba=MambaConfig(head_dim=4, ngroups=1)), Layout.tile("M", 2))


def test_build_model_validates_before_touching_megatron() -> None:
    """No parallel state exists in this test: reaching megatron would fail differently."""
    from nam_spec.model import build_model

    with pytest.raises(SpecConfigError, match="E needs at least one expert"):
        build_model("NAM56R", tiny(moe=MoEConfig(num_experts=0)))


def test_presets_are_valid_for_nam56r() -> None:
    for name in PRESETS:
        validate(preset(name), LAYOUT)
    reference = preset("nam56r")
    assert (reference.hidden_size, reference.attention.num_heads, reference.attention.num_kv_heads) == (
        3584,
        56,
        8,
    )
    assert reference.head_dim == 64
    assert preset("nam56r-small", seq_length=512).seq_length == 512
    with pytest.raises(KeyError, match="presets: nam56r"):
        preset("nam99")

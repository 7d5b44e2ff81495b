from dataclasses import replace

import pytest
from helpers import MAMBA3, tiny

from nam_layout import Layout
from nam_spec.config import AttentionConfig, MambaConfig, MoEConfig, ParallelConfig, SpecConfigError
from nam_spec.presets import PRESETS, preset
from nam_spec.validation import validate

LAYOUT = Layout.tile("AEMEAEMEAEMR", 52)


TP8 = ParallelConfig(tensor=8, sequence_parallel=True)
TP2 = ParallelConfig(tensor=2)


@pytest.mark.parametrize(
    ("changes", "parallel", "layout", "message"),
    [
        (
            {"hidden_size": 30},
            None,
            LAYOUT,
            "model.hidden_size 30 is not divisible by model.attention.num_heads 4",
        ),
        (
            {"attention": AttentionConfig(num_heads=4, num_kv_heads=3)},
            None,
            LAYOUT,
            "multiple of model.attention.num_kv_heads 3",
        ),
        ({}, TP8, LAYOUT, "model.attention.num_heads 4 is not divisible by parallel.tensor 8"),
        ({"moe": MoEConfig(num_experts=0)}, None, LAYOUT, "E layers need at least one expert"),
        (
            {"moe": MoEConfig(num_experts=4, top_k=5)},
            None,
            LAYOUT,
            "model.moe.top_k 5 must lie in 1..model.moe.num_experts (4)",
        ),
        ({}, TP2, LAYOUT, "E layers with parallel.tensor > 1 need parallel.sequence_parallel = true"),
        ({}, TP2, Layout.tile("AMR", 3), "R layers with parallel.tensor > 1 need parallel.sequence_parallel"),
        *(
            (
                {"moe": MoEConfig(dispatcher="local")},
                parallel,
                LAYOUT,
                f"model.moe.dispatcher 'local' with parallel.tensor {tp}, parallel.expert {ep}, expert "
                f"tensor size {etp}: it needs all three 1; otherwise use 'alltoall' or 'allgather'",
            )
            for parallel, tp, ep, etp in (
                (ParallelConfig(expert=2), 1, 2, 1),
                (ParallelConfig(tensor=2, sequence_parallel=True, expert_tensor=1), 2, 1, 1),
                (ParallelConfig(expert_tensor=2), 1, 1, 2),
            )
        ),
        ({"backend": "cuda"}, None, LAYOUT, "model.backend 'cuda' is unknown; accepted: 'local', 'te'"),
        ({"recompute": {"A": "most"}}, None, LAYOUT, "model.recompute['A'] = 'most'"),
        ({"recompute": "most"}, None, LAYOUT, "model.recompute['every letter'] = 'most'"),
        ({"hidden_size": 0}, None, LAYOUT, "model.hidden_size must be a positive integer"),
        ({"mamba": MambaConfig(path="fast")}, None, LAYOUT, "model.mamba.path 'fast' with model.mamba.kind"),
        (
            {"mamba": MambaConfig(kind="mamba4")},
            None,
            LAYOUT,
            "model.mamba.kind 'mamba4'; accepted: 'mamba2', 'mamba3'",
        ),
        (
            {"mamba": MambaConfig(path="triton")},
            None,
            LAYOUT,
            "'triton' with model.mamba.kind 'mamba2'; accepted",
        ),
        (
            {"mamba": replace(MAMBA3, path="fused")},
            None,
            LAYOUT,
            "'fused' with model.mamba.kind 'mamba3'; accepted",
        ),
        (
            {"mamba": replace(MAMBA3, rope_fraction=0.25)},
            None,
            LAYOUT,
            "model.mamba.rope_fraction 0.25 with kind",
        ),
        (
            {"mamba": replace(MAMBA3, path="auto", d_state=12)},
            None,
            LAYOUT,
            "model.mamba.d_state 12 with kind 'mamba3' must be a power of two",
        ),
        (
            {"mamba": MAMBA3},
            TP2,
            Layout.tile("M", 2),
            "M layers of kind 'mamba3' with parallel.tensor > 1 need",
        ),
    ],
)
def test_bad_configs_fail_with_what_and_where(
    changes: dict, parallel: ParallelConfig | None, layout: Layout, message: str
) -> None:
    with pytest.raises(SpecConfigError) as e:
        validate(tiny(**changes), layout, parallel)
    assert message in str(e.value)


def test_every_problem_is_reported_at_once() -> None:
    config = tiny(hidden_size=30, moe=MoEConfig(num_experts=0), backend="cuda")
    with pytest.raises(SpecConfigError) as err:
        validate(config, LAYOUT)
    for part in ("model.hidden_size 30", "at least one expert", "model.backend 'cuda'"):
        assert part in str(err.value)


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

    config = tiny(moe=MoEConfig(num_experts=0))
    with pytest.raises(SpecConfigError, match="E layers need at least one expert"):
        build_model(config.layout(), config)


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
    assert preset("nam56r-tiny").layout() == LAYOUT
    with pytest.raises(KeyError, match="presets: nam56r"):
        preset("nam99")

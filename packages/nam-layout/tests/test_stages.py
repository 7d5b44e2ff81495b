import itertools
import math
import re

import pytest

from nam_layout import CostModel, Layout, LayoutError, get_family, plan_stages


def _brute_force_best(costs: list[float], k: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def test_nam56r_four_stages_balanced_and_ordered() -> None:
    layout = get_family("NAM56R").layout()
    plan = plan_stages(layout, 4)
    assert len(plan.chunks) == 4
    assert plan.chunks[0][0] == 0 and plan.chunks[-1][1] == 52
    assert all(a[1] == b[0] for a, b in itertools.pairwise(plan.chunks))
    costs = CostModel().layer_costs(layout)
    assert max(plan.chunk_costs) == pytest.approx(_brute_force_best(costs, 4))
    assert plan.imbalance < 1.05
    assert plan.warnings == ()


@pytest.mark.parametrize(
    ("pattern", "depth", "k"), [("AEMR", 9, 3), ("AEMEAEMEAEMR", 14, 4), ("M-", 7, 7), ("AE", 5, 1)]
)
def test_split_is_optimal_against_brute_force(pattern: str, depth: int, k: int) -> None:
    layout = Layout.tile(pattern, depth)
    plan = plan_stages(layout, k)
    assert max(plan.chunk_costs) == pytest.approx(_brute_force_best(CostModel().layer_costs(layout), k))


def test_virtual_stages_interleave_ranks() -> None:
    plan = plan_stages(get_family("NAM52").layout(), stages=2, virtual=2)
    assert [plan.rank(k) for k in range(4)] == [0, 1, 0, 1]
    assert [plan.virtual_stage(k) for k in range(4)] == [0, 0, 1, 1]
    assert plan.offset(1, 1) == plan.chunks[3][0]
    assert plan.chunk_kinds(0, 1) == plan.layout.kinds[slice(*plan.chunks[2])]
    assert len(plan.rank_costs) == 2


def test_explicit_cuts_are_honoured() -> None:
    layout = Layout.tile("AEMEAE|MEAEMR", 12)
    plan = plan_stages(layout, 2)
    assert plan.chunks == ((0, 6), (6, 12))
    with pytest.raises(LayoutError, match="cuts make 2 segments, but 4 stages x 1 virtual needs 4"):
        plan_stages(layout, 4)


def test_refuses_more_chunks_than_layers() -> None:
    with pytest.raises(
        LayoutError, match=r"3 stages x 2 virtual = 6 chunks for 5 layers would leave a stage empty"
    ):
        plan_stages(Layout.tile("AEM", 5), 3, 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_stage_count_must_be_positive_int(bad: object) -> None:
    with pytest.raises(LayoutError, match="stages must be a positive integer"):
        plan_stages(Layout.tile("AE", 4), bad)  # type: ignore[arg-type]


def test_warns_for_rank_without_experts() -> None:
    plan = plan_stages(Layout.tile("AEEE|AMAM", 8), 2)
    assert len(plan.warnings) == 1 and "pipeline rank 1 has no E layer" in plan.warnings[0]
    assert plan_stages(Layout.tile("AMAM|AMAM", 8), 2).warnings == ()  # no MoE at all: nothing to hang


def test_custom_costs_and_output_layer_shift_the_cut() -> None:
    layout = Layout.tile("A", 8)
    assert plan_stages(layout, 2).chunks == ((0, 4), (4, 8))
    heavy_output = plan_stages(layout, 2, costs=CostModel({"A": 1.0}, output=4.0))
    assert heavy_output.chunks == ((0, 6), (6, 8))
    assert heavy_output.chunk_costs == (6.0, 6.0)
    assert heavy_output.imbalance == pytest.approx(1.0)


def test_cost_model_needs_every_letter() -> None:
    with pytest.raises(LayoutError, match=r"no weight for letter\(s\) \['R'\]"):
        plan_stages(Layout.tile("AR", 4), 2, costs=CostModel({"A": 1.0}))
    with pytest.raises(LayoutError, match="non-negative"):
        plan_stages(Layout.tile("A", 4), 2, costs=CostModel({"A": -1.0}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per_letter": {"A": math.inf}}, "cost of 'A' must be a finite non-negative number, got inf"),
        ({"per_letter": {"A": math.nan}}, "cost of 'A' must be a finite non-negative number, got nan"),
        ({"output": -5.0}, "output cost must be a finite non-negative number, got -5.0"),
        ({"embedding": math.nan}, "embedding cost must be a finite non-negative number, got nan"),
    ],
)
def test_cost_model_refuses_costs_that_cannot_balance(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LayoutError, match=re.escape(message)):
        CostModel(**kwargs)  # type: ignore[arg-type]

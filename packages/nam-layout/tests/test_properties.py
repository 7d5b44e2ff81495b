"""Hypothesis properties of tiling, counting and stage planning."""

from hypothesis import given, settings
from hypothesis import strategies as st

from nam_layout import CostModel, Layout, plan_stages

letters = st.sampled_from("AMER-")
patterns = st.text(letters, min_size=1, max_size=24)


@given(patterns, st.integers(1, 200))
def test_tiling_round_trips(pattern: str, depth: int) -> None:
    layout = Layout.tile(pattern, depth)
    assert layout.depth == depth
    assert all(layout.kinds[i] == pattern[i % len(pattern)] for i in range(depth))
    assert Layout.from_json(layout.to_json()) == layout


@given(patterns, st.integers(1, 200))
def test_counts_and_indices_partition_the_depth(pattern: str, depth: int) -> None:
    layout = Layout.tile(pattern, depth)
    assert sum(layout.counts.values()) == depth
    every = sorted(i for k in layout.letters for i in layout.indices(k))
    assert every == list(range(depth))


@given(st.lists(st.text(letters, min_size=1, max_size=8), min_size=1, max_size=6))
def test_cut_patterns_concatenate(segments: list[str]) -> None:
    layout = Layout.tile("|".join(segments), sum(map(len, segments)))
    assert layout.segment_kinds() == tuple(segments)
    assert layout.kinds == "".join(segments)


@settings(max_examples=150)
@given(
    patterns,
    st.integers(1, 120),
    st.integers(1, 6),
    st.integers(1, 3),
    st.dictionaries(letters, st.floats(0.0, 5.0), min_size=5, max_size=5),
)
def test_split_covers_every_layer_once_in_order(
    pattern: str, depth: int, stages: int, virtual: int, weights: dict[str, float]
) -> None:
    layout = Layout.tile(pattern, depth)
    if stages * virtual > depth:
        return
    plan = plan_stages(layout, stages, virtual, CostModel(weights))
    assert len(plan.chunks) == stages * virtual
    assert plan.chunks[0][0] == 0 and plan.chunks[-1][1] == depth
    assert all(a < b for a, b in plan.chunks)  # none empty
    assert all(prev[1] == nxt[0] for prev, nxt in zip(plan.chunks, plan.chunks[1:], strict=False))
    assert abs(sum(plan.chunk_costs) - sum(weights[k] for k in layout.kinds)) < 1e-6
    assert plan.imbalance >= 1.0 - 1e-9

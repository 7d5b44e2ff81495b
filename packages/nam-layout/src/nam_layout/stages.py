"""Pipeline-stage planning: split a layout into contiguous chunks of balanced cost.

With P pipeline ranks and V virtual stages per rank there are P*V chunks, in layer order; chunk
k runs on rank ``k % P`` as its virtual stage ``k // P`` (megatron-core's interleaved order).
A layout with explicit ``|`` cuts is taken as written: it must have exactly P*V segments.
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nam_layout.layout import Layout, LayoutError

# Relative cost of one layer of each kind, attention = 1. Derived from forward+backward model
# FLOPs per token at NAM56R geometry (DESIGN.md): A 29.4 M weights + causal attention at seq 4096
# ~264 MFLOP; E 4 of 16 experts of FFN 896 + shared 1024 ~297 (1.15); M in/out projections of
# 81 M weights ~487 (1.85); R's few weights are cheap but its scan is a latency-bound walk
# through time measured near an attention layer's time (1.0); '-' a dense MLP ~ an expert layer
# without routing (1.0); L, a variant of A, is weighted as A (not measured). Pass your own
# weights where your geometry or measurements differ.
DEFAULT_COSTS: Mapping[str, float] = MappingProxyType(
    {"A": 1.0, "E": 1.15, "M": 1.85, "R": 1.0, "-": 1.0, "L": 1.0}
)


@dataclass(frozen=True)
class CostModel:
    """Per-letter layer costs plus the embedding (first chunk) and output layer (last chunk).

    ``embedding`` and ``output`` default to 0 because they depend on vocabulary and width,
    which a layout does not know; NAM56R's untied output layer (65536 x 3584) costs about five
    attention layers, so set ``output=5`` to keep the last stage light for it.
    """

    per_letter: Mapping[str, float] = DEFAULT_COSTS
    embedding: float = 0.0
    output: float = 0.0

    def __post_init__(self) -> None:
        for what, cost in (
            *((f"cost of {letter!r}", c) for letter, c in self.per_letter.items()),
            ("embedding cost", self.embedding),
            ("output cost", self.output),
        ):
            if isinstance(cost, bool) or not isinstance(cost, numbers.Real) or not 0 <= cost < math.inf:
                raise LayoutError(f"{what} must be a finite non-negative number, got {cost!r}")

    def layer_costs(self, layout: Layout) -> list[float]:
        missing = sorted(set(layout.kinds) - set(self.per_letter))
        if missing:
            raise LayoutError(
                f"the cost model has no weight for letter(s) {missing}; give one per letter used"
            )
        costs = [float(self.per_letter[k]) for k in layout.kinds]
        costs[0] += self.embedding
        costs[-1] += self.output
        return costs


@dataclass(frozen=True)
class StagePlan:
    layout: Layout
    stages: int  # P, pipeline ranks
    virtual: int  # V, virtual stages per rank
    chunks: tuple[tuple[int, int], ...]  # [start, stop) per chunk, P*V of them, in layer order
    chunk_costs: tuple[float, ...]

    def rank(self, chunk: int) -> int:
        return chunk % self.stages

    def virtual_stage(self, chunk: int) -> int:
        return chunk // self.stages

    def chunk_index(self, rank: int, virtual_stage: int = 0) -> int:
        if not (0 <= rank < self.stages and 0 <= virtual_stage < self.virtual):
            raise IndexError(
                f"rank {rank} / virtual stage {virtual_stage} outside {self.stages} x {self.virtual}"
            )
        return virtual_stage * self.stages + rank

    def chunk_kinds(self, rank: int, virtual_stage: int = 0) -> str:
        """Letters of the layers that rank ``rank`` builds as virtual stage ``virtual_stage``."""
        start, stop = self.chunks[self.chunk_index(rank, virtual_stage)]
        return self.layout.kinds[start:stop]

    def offset(self, rank: int, virtual_stage: int = 0) -> int:
        """Global index of the first layer of that chunk (for global layer numbering)."""
        return self.chunks[self.chunk_index(rank, virtual_stage)][0]

    @property
    def rank_costs(self) -> tuple[float, ...]:
        totals = [0.0] * self.stages
        for k, cost in enumerate(self.chunk_costs):
            totals[self.rank(k)] += cost
        return tuple(totals)

    @property
    def imbalance(self) -> float:
        """Cost of the busiest rank over the mean rank cost: 1.0 is perfect balance."""
        costs = self.rank_costs
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    @property
    def warnings(self) -> tuple[str, ...]:
        if "E" not in self.layout.kinds or self.stages == 1:
            return ()
        found = []
        for rank in range(self.stages):
            if not any("E" in self.chunk_kinds(rank, v) for v in range(self.virtual)):
                found.append(
                    f"pipeline rank {rank} has no E layer: megatron-core's MoE aux-loss and metric "
                    f"reduction across pipeline ranks can hang when a rank never records them; "
                    f"initialise the MoE metrics on every rank or move a cut"
                )
        return tuple(found)

    def cut_pattern(self) -> str:
        """The layout's letters with '|' between chunks."""
        return "|".join(self.layout.kinds[a:b] for a, b in self.chunks)

    def to_dict(self) -> dict[str, object]:
        return {
            "stages": self.stages,
            "virtual": self.virtual,
            "chunks": [
                {
                    "chunk": k,
                    "rank": self.rank(k),
                    "virtual_stage": self.virtual_stage(k),
                    "start": a,
                    "stop": b,
                    "kinds": self.layout.kinds[a:b],
                    "cost": round(self.chunk_costs[k], 6),
                }
                for k, (a, b) in enumerate(self.chunks)
            ],
            "rank_costs": [round(c, 6) for c in self.rank_costs],
            "imbalance": round(self.imbalance, 6),
            "warnings": list(self.warnings),
            "cut_pattern": self.cut_pattern(),
        }


def plan_stages(layout: Layout, stages: int, virtual: int = 1, costs: CostModel | None = None) -> StagePlan:
    """Split ``layout`` over ``stages`` pipeline ranks x ``virtual`` virtual stages.

    Explicit '|' cuts are honoured as written. Otherwise the chunks minimise the cost of the
    most expensive chunk (exact for the given costs, up to float rounding), each non-empty.
    """
    for name, value in (("stages", stages), ("virtual", virtual)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"{name} must be a positive integer, got {value!r}")
    costs = costs or CostModel()
    layer_costs = costs.layer_costs(layout)
    n_chunks = stages * virtual
    if n_chunks > layout.depth:
        raise LayoutError(
            f"{stages} stages x {virtual} virtual = {n_chunks} chunks for {layout.depth} layers would leave a "
            f"stage empty; use at most {layout.depth} chunks"
        )
    if layout.has_cuts:
        if len(layout.segments) != n_chunks:
            raise LayoutError(
                f"the pattern's '|' cuts make {len(layout.segments)} segments, but {stages} stages x "
                f"{virtual} virtual needs {n_chunks}; cut the pattern into {n_chunks} segments or drop the cuts"
            )
        chunks = layout.segments
    else:
        chunks = _balanced_chunks(layer_costs, n_chunks)
    prefix = [0.0, *itertools.accumulate(layer_costs)]
    chunk_costs = tuple(prefix[b] - prefix[a] for a, b in chunks)
    return StagePlan(layout, stages, virtual, tuple(chunks), chunk_costs)


def _balanced_chunks(costs: list[float], k: int) -> tuple[tuple[int, int], ...]:
    """Contiguous non-empty chunks minimising the maximum chunk cost (binary search on it)."""
    n = len(costs)
    prefix = [0.0, *itertools.accumulate(costs)]

    def greedy(limit: float) -> list[tuple[int, int]] | None:
        chunks, start = [], 0
        for c in range(k):
            left = k - c - 1  # chunks still to fill after this one, one layer each at least
            stop = bisect.bisect_right(prefix, prefix[start] + limit, lo=start + 1) - 1
            stop = min(stop, n - left)
            if stop <= start:
                return None
            if c == k - 1 and stop < n:
                return None
            chunks.append((start, stop))
            start = stop
        return chunks

    lo, hi = max(costs), prefix[-1]
    best = greedy(hi * (1 + 1e-12) + 1e-12)
    assert best is not None
    for _ in range(100):
        if hi - lo <= 1e-9 * max(1.0, hi):
            break
        mid = (lo + hi) / 2
        found = greedy(mid * (1 + 1e-12) + 1e-12)
        if found is None:
            lo = mid
        else:
            hi, best = mid, found
    return tuple(best)

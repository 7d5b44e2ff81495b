"""What an intervention touched, for the trainer to log."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Record:
    """One intervention on one logical block (or one layer, for ReDo).

    step: the optimizer step it ran after. kind: "fire", "dash" or "redo". block: the logical
    block's name (parameter name plus the part, e.g. ``...linear_qkv.weight[q]``). tensors: the
    parameter names it wrote. rows: the touched output rows of the block (None: all of them);
    for ReDo, the recycled neurons. norm_before / norm_after: Frobenius norms of the block, over
    the gathered weight when it is sharded. residual: FIRE's measured orthogonality residual.
    extra: anything specific (FIRE step counts, DASH scale statistics, dormant fraction).
    """

    step: int
    kind: str
    block: str
    tensors: list[str]
    rows: list[int] | None
    norm_before: float
    norm_after: float
    residual: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

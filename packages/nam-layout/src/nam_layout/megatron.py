"""Translation to megatron-core's ``hybrid_layer_pattern`` (megatron-core 0.19 symbols)."""

from __future__ import annotations

from collections.abc import Mapping

from nam_layout.layout import Layout, LayoutError
from nam_layout.stages import StagePlan

# Our letter -> megatron-core's symbol (L, multi-latent attention, is megatron's '+'; megatron
# refuses '*' and '+' in one model). R (M2RNN) has no megatron-core block.
MEGATRON_SYMBOLS: Mapping[str, str] = {"A": "*", "M": "M", "E": "E", "-": "-", "L": "+"}
_MEGATRON_LAYER_SYMBOLS = frozenset("M*E-GD+")  # what megatron-core 0.19's grammar accepts as layers


def to_megatron(
    layout: Layout,
    plan: StagePlan | None = None,
    *,
    pipeline_size: int = 1,
    map_letters: Mapping[str, str] | None = None,
) -> str:
    """The expanded, depth-long megatron pattern, with '|' between the planned chunks.

    With a ``plan``, chunk k of it is megatron's segment k (pipeline rank k mod P, virtual stage
    k div P). Without one, a layout's own '|' cuts are kept; a layout without cuts under
    ``pipeline_size`` > 1 relies on megatron's even split and so needs depth % pipeline_size == 0.
    Letters with no megatron block (R, family letters) fail unless ``map_letters`` maps them,
    e.g. ``{"R": "M"}``.
    """
    symbols = dict(MEGATRON_SYMBOLS)
    for letter, symbol in (map_letters or {}).items():
        if letter not in layout.letters:
            raise LayoutError(
                f"cannot map {letter!r}: not a layer letter of this layout (its letters: {' '.join(layout.letters)})"
            )
        if symbol in MEGATRON_SYMBOLS:  # allow mapping to one of our letters, e.g. R -> M
            symbol = MEGATRON_SYMBOLS[symbol]
        if symbol not in _MEGATRON_LAYER_SYMBOLS:
            raise LayoutError(
                f"cannot map {letter!r} to {symbol!r}: megatron-core layer symbols are "
                f"{' '.join(sorted(_MEGATRON_LAYER_SYMBOLS))} (or one of our letters {' '.join(MEGATRON_SYMBOLS)})"
            )
        symbols[letter] = symbol
    unmapped = sorted(set(layout.kinds) - set(symbols))
    if unmapped:
        why = "; ".join(f"{k} ({layout.letters[k]}) has no megatron-core block" for k in unmapped)
        raise LayoutError(f"{why}; map it explicitly to translate, e.g. map_letters={{'{unmapped[0]}': 'M'}}")
    table = str.maketrans(symbols)
    if plan is not None:
        if plan.layout != layout:
            raise LayoutError("the stage plan was made for another layout")
        return "|".join(layout.kinds[a:b].translate(table) for a, b in plan.chunks)
    if layout.has_cuts:
        return layout.cut_pattern().translate(table)
    if isinstance(pipeline_size, bool) or not isinstance(pipeline_size, int) or pipeline_size < 1:
        raise LayoutError(f"pipeline_size must be a positive integer, got {pipeline_size!r}")
    if layout.depth % pipeline_size:
        raise LayoutError(
            f"without '|' cuts megatron-core splits the {layout.depth} layers evenly and needs depth % "
            f"pipeline size == 0 ({layout.depth} % {pipeline_size} = {layout.depth % pipeline_size}); plan "
            f"the stages (nam-layout split / plan_stages) to emit explicit cuts"
        )
    return layout.kinds.translate(table)

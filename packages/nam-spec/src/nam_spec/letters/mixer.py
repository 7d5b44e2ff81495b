"""The spec shared by the letters whose layer is a nam-mixers core behind our MixerLayer (M, R)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nam_spec.backends import Backend


def mixer_spec(backend: Backend, adapter: type, geometry: dict[str, object]) -> Any:
    """norm -> ``adapter`` (a nam-mixers core between parallel projections) -> bda."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.spec_utils import ModuleSpec

    from nam_spec.adapters import MixerLayer, MixerLayerSubmodules

    b = backend
    return ModuleSpec(
        module=MixerLayer,
        submodules=MixerLayerSubmodules(
            norm=b.norm,
            mixer=ModuleSpec(
                module=adapter,
                params={"column_linear": b.column_linear, "row_linear": b.row_linear, **geometry},
            ),
            bda=get_bias_dropout_add,
        ),
    )

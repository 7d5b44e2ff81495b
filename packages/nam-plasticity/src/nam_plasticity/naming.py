"""Names that mean the same on every rank: megatron names layers and experts by their local
index on a pipeline stage or expert-parallel rank; records, metrics and ReDo's seeds use the
global layer index (``layer_number - 1``) and the global expert index instead."""

from __future__ import annotations

import re

from torch import nn

_LOCAL_EXPERT = re.compile(r"^(?P<moe>.*)\.experts\.local_experts\.(?P<i>\d+)(?P<rest>(\..*)?)$")


def global_names(chunk: nn.Module) -> dict[str, str]:
    """Module name -> global name for every module of a model chunk."""
    modules = dict(chunk.named_modules())
    out = {}
    for name in modules:
        parts = name.split(".") if name else []
        for cut in range(len(parts), 0, -1):  # the deepest ancestor that knows its layer number
            number = getattr(modules[".".join(parts[:cut])], "layer_number", None)
            if isinstance(number, int) and parts[cut - 1].isdigit():
                parts[cut - 1] = str(number - 1)
                break
        renamed = ".".join(parts)
        m = _LOCAL_EXPERT.match(name)
        indices = getattr(modules.get(m.group("moe")), "local_expert_indices", None) if m else None
        if m and indices is not None:
            prefix = _LOCAL_EXPERT.match(renamed)
            renamed = (
                f"{prefix.group('moe')}.experts.local_experts.{indices[int(m.group('i'))]}{m.group('rest')}"
            )
        out[name] = renamed
    return out


def expert_indices(modules: dict[str, nn.Module], name: str, count: int) -> list[int]:
    """Global indices of the ``count`` local experts of the module ``name``: the
    ``local_expert_indices`` of its nearest ancestor that has them (megatron's MoE layer), else
    0..count-1."""
    parts = name.split(".") if name else []
    for cut in range(len(parts), -1, -1):
        indices = getattr(modules.get(".".join(parts[:cut])), "local_expert_indices", None)
        if indices is not None:
            if len(indices) != count:
                raise ValueError(f"{name}: {count} local experts but its MoE layer lists {list(indices)}")
            return list(indices)
    return list(range(count))

"""Which module fills each slot of a layer: the `local` backend (the default) and `te`.

`te` names Transformer Engine's fused modules through megatron-core's wrappers. TE cannot be
installed on our machines, so the `te` backend is tested structurally only (which class each
slot names) and has never been executed: it is built only when asked for, with a warning, and
never chosen automatically. On a machine without a driver TE raises RuntimeError or OSError
rather than ImportError, so any exception means "not available", and ``te_unavailable()`` says
which one.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch

_TE_MODULE = "megatron.core.extensions.transformer_engine"
TE_UNTESTED = (
    "model.backend = 'te': the Transformer Engine backend is tested structurally only (which class "
    "fills each slot) and has never been executed by this project; 'local' is the tested one"
)


@dataclass(frozen=True)
class Backend:
    """Module classes per slot. ``fused_norm`` means the norm lives inside the first linear."""

    name: str
    norm: Any
    column_linear: Any
    row_linear: Any
    norm_column_linear: Any  # norm + column linear in one module (te), or None
    core_attention: Any
    experts: Any  # an ExpertsBuilder for MoELayer

    @property
    def fused_norm(self) -> bool:
        return self.norm_column_linear is not None


def te_unavailable() -> str | None:
    """Why Transformer Engine cannot be used here, or None when it can."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # driverless machines raise RuntimeError/OSError, not ImportError
        return f"importing transformer_engine.pytorch raised {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    return None


def local_backend() -> Backend:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from nam_spec.local import GroupedExperts, RMSNorm, SDPAttention

    return Backend(
        "local", RMSNorm, ColumnParallelLinear, RowParallelLinear, None, SDPAttention, GroupedExperts
    )


def te_backend(*, check: bool = True) -> Backend:
    """The TE backend; ``check=False`` builds it without TE for structural inspection only."""
    if check and (reason := te_unavailable()) is not None:
        raise RuntimeError(
            f"model.backend = 'te' requested, but Transformer Engine is not usable here: {reason}; "
            "use model.backend = 'local'"
        )
    if check:
        warnings.warn(TE_UNTESTED, stacklevel=2)
    from functools import partial

    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP

    te = importlib.import_module(_TE_MODULE)
    experts = partial(
        TEGroupedMLP,
        submodules=GroupedMLPSubmodules(
            linear_fc1=te.TEColumnParallelGroupedLinear, linear_fc2=te.TERowParallelGroupedLinear
        ),
    )
    return Backend(
        "te",
        te.TENorm,
        te.TEColumnParallelLinear,
        te.TERowParallelLinear,
        te.TELayerNormColumnParallelLinear,
        te.TEDotProductAttention,
        experts,
    )


def resolve_backend(name: str) -> Backend:
    if name == "local":
        return local_backend()
    if name == "te":
        return te_backend()
    raise ValueError(f"model.backend {name!r} is unknown; accepted: 'local', 'te'")

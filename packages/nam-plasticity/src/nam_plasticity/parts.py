"""The plasticity-parts protocol: how a module tells FIRE, DASH and ReDo what its weights hold.

A module implements one method, ``plasticity_parts() -> PlasticityParts``, returning plain data
(a model package writes it without importing this one):

    {"rows": {parameter path below the module: RowParts, ...},  # the blocks FIRE and DASH act on
     "neurons": Neurons}                                        # the hidden units ReDo tracks

Both keys are optional. A module that does not implement the method is read by the megatron
rules (``nam_plasticity.megatron``), which give the same data for megatron-core's linear layers
and MLPs; FIRE, DASH and ReDo read nothing else. A module that implements the method is
described by it alone, and a parameter it declares is never also split by the megatron rules of
the module that holds it.
"""

# No ``from __future__ import annotations``: TypedDict sees ``Required`` only in evaluated annotations.
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Required, TypedDict

import torch
import torch.distributed as dist
from torch import nn

from nam_plasticity import megatron

ActivationHook = Callable[[torch.Tensor, torch.Tensor | None], None]


class RowParts(TypedDict, total=False):
    """One parameter's logical matrices (an entry of ``rows``); every key is optional.

    parts: ordered ``(name, local rows)`` of one period of the rows; absent or empty: the whole
        matrix is one block. repeat: how many periods the rows hold (default 1); part i of every
        period is one block (head-major layouts: per local head [v, g, f] -> repeat = heads).
        The sizes are this rank's, so on a column-parallel weight each part's rows gathered
        over the ranks are that part of the gathered weight.
    expert_dim: for a 3-D weight, the axis that indexes (local) experts, 0 or 1; each expert
        is its own block. The input features are always the last axis.
    group: the tensor-parallel group the weight is split over (megatron's
        ``tensor_model_parallel`` / ``partition_dim`` say whether and along which axis);
        absent: the owning module's ``tp_group``.
    role: what the matrix is, carried into ``Block.role`` (default ``"declared"``);
        ``find_blocks(mode="qk")`` selects the parts ``q`` and ``k`` of role ``"attn_qkv"``.
    """

    parts: Sequence[tuple[str, int]]
    repeat: int
    expert_dim: int
    group: dist.ProcessGroup | None
    role: str


class Neurons(TypedDict, total=False):
    """The hidden units of one MLP, or of all local experts of a grouped MLP (``neurons``).

    fc1, fc2: parameter paths below the module of the incoming weight ``[(2 x) F, H]`` and the
        outgoing weight ``[H, F]``; for grouped experts ``[E, (2 x) F, H]`` and ``[E, H, F]``,
        each expert then being its own layer. Unit i: row i of fc1 (gate row i and up row i when
        gated), column i of fc2.
    gated: fc1 holds the gate rows, then the up rows (SwiGLU); default False.
    group: the tensor-parallel group the units are split over (None: not split).
    init_std: std of a fresh fc1 row (None: nn.Linear's 1 / sqrt(3 fan_in)).
    activations: ``activations(hook) -> handle with .remove()`` makes the module call
        ``hook(act [..., F_local], tokens_per_expert [E_local] or None)`` with fc2's input every
        forward; for grouped experts the rows of ``act`` are grouped by expert.
    """

    fc1: Required[str]
    fc2: Required[str]
    gated: bool
    group: dist.ProcessGroup | None
    init_std: float | None
    activations: Required[Callable[[ActivationHook], Any]]


class PlasticityParts(TypedDict, total=False):
    """What ``plasticity_parts()`` returns; both keys are optional."""

    rows: Mapping[str, RowParts]
    neurons: Neurons


@dataclass(frozen=True)
class Declaration:
    """One module's parts. own: the module declared them itself (not the megatron rules);
    source: where they came from, for error messages."""

    name: str
    module: nn.Module
    parts: PlasticityParts
    own: bool
    source: str


def declarations(chunk: nn.Module) -> Iterator[Declaration]:
    """Every module's parts, in ``named_modules`` order: its own ``plasticity_parts()``, else what
    the megatron rules recognise (modules neither declares are left out)."""
    modules = dict(chunk.named_modules())
    for name, module in modules.items():
        declare = getattr(module, "plasticity_parts", None)
        where = f"at {name or '<root>'}"
        own = callable(declare)
        if own:
            parts, source = declare(), f"{type(module).__name__}.plasticity_parts() {where}"
        else:
            parent_name, _, leaf = name.rpartition(".")
            parts = megatron.parts(module, leaf, modules.get(parent_name))
            source = f"the megatron rules for {type(module).__name__} {where}"
        if parts:
            unknown = set(parts) - set(PlasticityParts.__annotations__)
            if unknown:
                raise ValueError(
                    f"{source}: unknown keys {sorted(unknown)}; "
                    f"accepted {sorted(PlasticityParts.__annotations__)}"
                )
            yield Declaration(name, module, parts, own, source)

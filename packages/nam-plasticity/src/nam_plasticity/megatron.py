"""The megatron rules: what megatron-core's modules would declare through ``plasticity_parts()``.

megatron-core's layers do not implement the protocol (``nam_plasticity.parts``), so these rules
read them by megatron's names and attributes and return the same data:

- a linear layer (a type name containing "linear": local ``ColumnParallelLinear`` /
  ``RowParallelLinear``, TE's linears and grouped linears) holds its matrices in ``weight``
  (2-D, or 3-D with experts on dim 0) or ``weight0..N`` (TE grouped, one per expert). By the
  layer's name: ``linear_qkv`` holds, per local query group, the rows of its query heads, then
  one key head and one value head; ``linear_fc1`` of a gated config the gate rows, then the up
  rows; ``in_proj`` of megatron's ``MambaMixer`` [z, x, B, C, dt]; any other is one matrix.
- an MLP (``linear_fc1`` and ``linear_fc2`` with 2-D weights: megatron's ``MLP``, each
  ``SequentialMLP`` expert) has neurons, whose activations are fc2's input (a forward pre-hook).
  TE's grouped linears (``weight0..N``) have none.
- nothing below a router, an embedding or the output layer is a block (``excluded``).
- a weight is split over tensor-parallel ranks when megatron marks it ``tensor_model_parallel``,
  along ``partition_dim``, over the owning module's ``tp_group`` (``tensor_split``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from nam_plasticity.params import local

if TYPE_CHECKING:
    from nam_plasticity.blocks import Split
    from nam_plasticity.parts import ActivationHook, Neurons, PlasticityParts, RowParts

EXCLUDED = ("router", "embedding", "output_layer")
_EXCLUDED_RE = re.compile(r"(^|\.)(" + "|".join(EXCLUDED) + r")(\.|$)")
_GROUPED_WEIGHT = re.compile(r"^weight\d+$")
_ROLES = {"linear_proj": "attn_out", "linear_fc2": "mlp_fc2", "out_proj": "mixer_out"}


def excluded(name: str) -> bool:
    """Whether the module ``name`` is (or is below) a router, an embedding or the output layer."""
    return bool(_EXCLUDED_RE.search(name))


def tensor_split(
    module: nn.Module,
    param: nn.Parameter,
    dims: tuple[int, int] = (0, 1),
    group: dist.ProcessGroup | None = None,
) -> tuple[Split | None, dist.ProcessGroup | None, int]:
    """How megatron splits ``param`` over tensor-parallel ranks: (split, group, size); ``dims``
    are its (row, column) axes, ``group`` overrides the module's ``tp_group``."""
    if not getattr(param, "tensor_model_parallel", False):
        return None, None, 1
    group = group if group is not None else getattr(module, "tp_group", None)
    size = group.size() if group is not None else 1
    if size == 1:
        return None, None, 1
    dim = getattr(param, "partition_dim", -1)
    if dim not in dims:
        raise ValueError(
            f"nam_plasticity: tensor-parallel parameter {tuple(param.shape)} with partition_dim={dim}; "
            f"accepted {dims[0]} (rows) or {dims[1]} (columns)"
        )
    return ("rows" if dim == dims[0] else "cols"), group, size


def parts(module: nn.Module, leaf: str, parent: nn.Module | None) -> PlasticityParts:
    """The parts of a module named ``leaf`` below ``parent`` (empty: nothing to declare)."""
    out: PlasticityParts = {}
    if "linear" in type(module).__name__.lower():
        rows = {
            pname: _linear_rows(module, leaf, parent, param)
            for pname, param in module.named_parameters(recurse=False)
            if (pname == "weight" and param.dim() in (2, 3))
            or (_GROUPED_WEIGHT.match(pname) and param.dim() == 2)
        }
        if rows:
            out["rows"] = rows
    neurons = _mlp_neurons(module)
    if neurons is not None:
        out["neurons"] = neurons
    return out


def _linear_rows(module: nn.Module, leaf: str, parent: nn.Module | None, param: nn.Parameter) -> RowParts:
    local_rows = local(param.detach()).shape[-2]
    spec: RowParts = {"role": _ROLES.get(leaf, "linear")}
    if param.dim() == 3:
        spec["expert_dim"] = 0
    if leaf == "linear_qkv":
        spec["role"] = "attn_qkv"
        dims = (0, 1) if param.dim() == 2 else (1, 2)
        spec.update(_qkv_parts(module, local_rows, tensor_split(module, param, dims)[2]))
    elif leaf == "linear_fc1":
        spec["role"] = "mlp_fc1"
        if getattr(getattr(module, "config", None), "gated_linear_unit", False):
            spec["parts"] = (("gate", local_rows // 2), ("up", local_rows // 2))
    elif leaf == "in_proj" and parent is not None and hasattr(parent, "d_inner_local_tp"):
        spec["role"] = "mamba_in"
        spec["parts"] = _mamba_parts(parent, local_rows)
    return spec


def _qkv_parts(module: nn.Module, local_rows: int, tp: int) -> RowParts:
    cfg = module.config
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    groups_local, q_per_group = groups // tp, heads // groups
    if groups_local * (q_per_group + 2) * head_dim != local_rows:
        raise ValueError(
            f"nam_plasticity: linear_qkv has {local_rows} local rows; heads={heads}, query groups={groups}, "
            f"head dim={head_dim}, tp={tp} give {groups_local * (q_per_group + 2) * head_dim}"
        )
    return {
        "parts": (("q", q_per_group * head_dim), ("k", head_dim), ("v", head_dim)),
        "repeat": groups_local,
    }


def _mamba_parts(mixer: nn.Module, local_rows: int) -> tuple[tuple[str, int], ...]:
    """megatron's MambaMixer lays in_proj's local rows out as [z, x, B, C, dt]."""
    gn = mixer.ngroups_local_tp * mixer.d_state
    sizes = (
        ("z", mixer.d_inner_local_tp),
        ("x", mixer.d_inner_local_tp),
        ("B", gn),
        ("C", gn),
        ("dt", mixer.nheads_local_tp),
    )
    if sum(n for _, n in sizes) != local_rows:
        raise ValueError(
            f"nam_plasticity: Mamba in_proj has {local_rows} local rows, its parts {dict(sizes)}"
        )
    return sizes


def _mlp_neurons(module: nn.Module) -> Neurons | None:
    fc1, fc2 = getattr(module, "linear_fc1", None), getattr(module, "linear_fc2", None)
    if not isinstance(fc1, nn.Module) or not isinstance(fc2, nn.Module):
        return None
    w1, w2 = getattr(fc1, "weight", None), getattr(fc2, "weight", None)
    if not isinstance(w1, nn.Parameter) or not isinstance(w2, nn.Parameter) or w1.dim() != 2:
        return None  # TE grouped linears (weight0..N)
    cfg = getattr(module, "config", None)

    def activations(hook: ActivationHook) -> torch.utils.hooks.RemovableHandle:
        # fc2's input holds each neuron's activation (silu(gate) * up for SwiGLU).
        return fc2.register_forward_pre_hook(lambda _, args: hook(args[0], None))

    return {
        "fc1": "linear_fc1.weight",
        "fc2": "linear_fc2.weight",
        "gated": bool(getattr(cfg, "gated_linear_unit", False)),
        "group": getattr(fc2, "tp_group", None),
        "init_std": getattr(cfg, "init_method_std", None),
        "activations": activations,
    }

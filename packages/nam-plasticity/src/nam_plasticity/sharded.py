"""The plan's running state as megatron-core sharded tensors, so that a checkpoint holds it and a
resumed run, at the same or another parallel layout, continues from it.

Each statistic is stored as the twin of the parameter it belongs to: the parameter's own entry of
the model's sharded state dict (its global shape, offsets, replica ids, and any factory that
splits it) with another key and the statistic as data. dist_checkpointing then reshards it
exactly as it reshards the parameter.

- DASH's gradient EMA (``plasticity.dash.<parameter key>``): shaped like the parameter. Under the
  distributed optimizer each data-parallel rank keeps the slice of the flattened parameter it
  owns; the slices are summed into the whole (zero-padded, exact) before saving, and each rank
  takes its own slice of the loaded whole.
- ReDo's activation EMA (``plasticity.redo.<fc2 key>``): one value per neuron, the twin of fc2 with its
  output axis (dim -2) of size one, so neurons (fc2's input columns) and experts are split as fc2
  is. Stored is the average over the layer's data-parallel replicas, the statistic ReDo scores
  with; every replica resumes from it. NaN marks an expert (or layer) without statistics yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nam_plasticity.blocks import find_blocks
from nam_plasticity.dash import Dash
from nam_plasticity.params import resolve
from nam_plasticity.redo import GroupedStats, MLPLayer, Redo


def parameter_entries(model_sharded: dict[str, Any]) -> dict[tuple[int, tuple[int, ...]], Any]:
    """(data pointer, shape) of each parameter -> its entry (ShardedTensor or factory) in the
    model chunks' sharded state dicts."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {
        (v.data.data_ptr(), tuple(v.data.shape)): v
        for v in nested_values(model_sharded)
        if isinstance(getattr(v, "data", None), torch.Tensor) and hasattr(v, "key")
    }


def _entry(entries: dict[tuple[int, tuple[int, ...]], Any], param: nn.Parameter, what: str) -> Any:
    entry = entries.get((param.data_ptr(), tuple(param.shape)))
    if entry is None:
        raise ValueError(
            f"nam_plasticity: {what}: parameter {tuple(param.shape)} is not in the model's sharded state "
            "dict; pass the sharded state dicts of the same model chunks the plan was attached to"
        )
    return entry


def _twin(entry: Any, key: str, data: torch.Tensor) -> Any:
    """``entry`` (a parameter's) holding ``data`` under ``key``."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(entry, ShardedTensor):
        return dataclasses.replace(entry, key=key, data=data, dtype=data.dtype)
    return dataclasses.replace(
        entry, key=key, data=data
    )  # a factory: it splits data as it split the parameter


def _neuron_twin(fc2: Any, key: str, ema: torch.Tensor) -> Any:
    """fc2's entry ([..., H, F]) with its output axis of size one: one value per neuron."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not isinstance(fc2, ShardedTensor) or fc2.global_offset[-2] != 0:
        raise ValueError(
            f"nam_plasticity: ReDo: {fc2.key} is not a ShardedTensor whole along its output axis"
        )

    def one(shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-2], 1, shape[-1])

    return dataclasses.replace(
        fc2,
        key=key,
        data=ema.reshape(one(fc2.local_shape)),
        dtype=ema.dtype,
        local_shape=one(fc2.local_shape),
        global_shape=one(fc2.global_shape),
        axis_fragmentations=None if fc2.axis_fragmentations is None else one(fc2.axis_fragmentations),
    )


# ------------------------------------------------------------------------------------------------
# DASH
# ------------------------------------------------------------------------------------------------


def dash_state(
    dash: Dash, model_chunks: Sequence[nn.Module], optimizer: Any, entries: dict
) -> dict[str, Any]:
    """The gradient EMA of every block's parameter as its twin (a collective under the distributed
    optimizer); zeros where no gradient was folded in yet, which is the EMA's start."""
    out: dict[str, Any] = {}
    for param in {id(b.param): b.param for b in find_blocks(model_chunks)}.values():
        entry = _entry(entries, param, "DASH")
        master = resolve(param, optimizer)
        whole = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        ema = dash.ema.get(id(param))
        if ema is not None:
            master.owned(whole).copy_(ema.view_as(master.owned(whole)))
        if master.sharded:
            dist.all_reduce(whole, group=master.group)
        key = f"plasticity.dash.{entry.key}"
        out[key] = _twin(entry, key, whole)
    return out


def load_dash(
    dash: Dash, model_chunks: Sequence[nn.Module], optimizer: Any, loaded: dict[str, Any], entries: dict
) -> None:
    for param in {id(b.param): b.param for b in find_blocks(model_chunks)}.values():
        whole = loaded[f"plasticity.dash.{_entry(entries, param, 'DASH').key}"]
        dash.ema[id(param)] = resolve(param, optimizer).owned(whole.float()).reshape(-1).clone()


# ------------------------------------------------------------------------------------------------
# ReDo
# ------------------------------------------------------------------------------------------------


def _modules(redo: Redo) -> list[list[MLPLayer]]:
    """The layers of each module ReDo watches: one dense MLP, or the local experts of a grouped one."""
    out: dict[str, list[MLPLayer]] = {}
    for layer in redo.layers:
        out.setdefault(layer.tensors[1], []).append(layer)
    return list(out.values())


def redo_state(redo: Redo, entries: dict) -> dict[str, Any]:
    """The replica-averaged activation EMA of every watched layer as fc2's neuron twin (a collective
    over each layer's data-parallel replicas)."""
    out: dict[str, Any] = {}
    for layers in _modules(redo):
        rows = []
        for layer in layers:
            ema = Redo.replica_ema(layer)
            rows.append(torch.full((layer.neurons,), float("nan")) if ema is None else ema.float().cpu())
        entry = _entry(entries, layers[0].fc2, "ReDo")
        key = f"plasticity.redo.{entry.key}"
        out[key] = _neuron_twin(entry, key, torch.stack(rows).to(layers[0].fc2.device))
    return out


def load_redo(redo: Redo, loaded: dict[str, Any], entries: dict) -> None:
    for layers in _modules(redo):
        ema = loaded[f"plasticity.redo.{_entry(entries, layers[0].fc2, 'ReDo').key}"].float()
        ema = ema.reshape(len(layers), layers[0].neurons).to(layers[0].fc2.device)
        seen = ~ema.isnan().any(-1)
        if layers[0].expert is None:
            layers[0].ema = ema[0].clone() if bool(seen[0]) else None
        else:
            redo.set_grouped(layers, GroupedStats(ema.nan_to_num(0.0), seen))

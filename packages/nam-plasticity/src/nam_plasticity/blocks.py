"""Logical blocks: the matrices an intervention acts on, which are not always whole tensors.

A fused qkv weight holds, per query group, the rows of its query heads, then one key head and
one value head; a SwiGLU fc1 holds the gate rows then the up rows (per tensor-parallel rank);
a Mamba in_proj holds [z, x, B, C, dt]; grouped experts hold one matrix per expert. Each of these
parts is its own block. Routers, embeddings and the output layer are never blocks.

A block on a tensor-parallel shard knows how its parameter is split ("rows" for a
column-parallel weight, "cols" for a row-parallel one), the group, and the gathered shape, so an
intervention can give the result it would give on the gathered weight. The row order of a
gathered part does not matter to FIRE, DASH or ReDo (each commutes with a row permutation).

A module declares the layout of a fused projection it owns with an optional method
``plasticity_row_parts(name) -> dict[str, Sequence[int]] | None``, ``name`` being the
projection's parameter path below it (e.g. ``"in_proj.weight"``) and the values the local row
indices of each part (a ``range`` for a contiguous part); None for a parameter it does not
split. megatron-core's attention, MLP and Mamba modules are recognised without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from nam_plasticity.naming import global_names
from nam_plasticity.params import local

Split = Literal["rows", "cols"]
Mode = Literal["all", "qk"]

EXCLUDED = ("router", "embedding", "output_layer")
_EXCLUDED_RE = re.compile(r"(^|\.)(" + "|".join(EXCLUDED) + r")(\.|$)")
_GROUPED_WEIGHT = re.compile(r"^weight(\d+)$")


@dataclass(frozen=True)
class Block:
    """One logical matrix inside a parameter.

    rows: indices of the block's rows in the local matrix (None: all rows). expert: index along
    dim 0 of a 3-D grouped parameter. split/group: how the parameter is split across
    tensor-parallel ranks (None: not split). global_shape: the gathered [rows, cols].
    """

    name: str
    param_name: str
    param: nn.Parameter
    part: str
    role: str
    rows: torch.Tensor | None
    expert: int | None
    split: Split | None
    group: dist.ProcessGroup | None
    global_shape: tuple[int, int]

    def matrix(self, full: torch.Tensor) -> torch.Tensor:
        """The block's local matrix (a copy) from a tensor shaped like the parameter."""
        m = full if self.expert is None else full[self.expert]
        return m.index_select(0, self.rows.to(m.device)) if self.rows is not None else m.clone()

    def put(self, full: torch.Tensor, value: torch.Tensor) -> None:
        """Write the block's local matrix into a tensor shaped like the parameter, in place."""
        m = full if self.expert is None else full[self.expert]
        if self.rows is None:
            m.copy_(value)
        else:
            m.index_copy_(0, self.rows.to(m.device), value.to(m.dtype))

    def mask(self) -> torch.Tensor:
        """Boolean mask, shaped like the parameter, of the entries this block covers."""
        data = local(self.param.detach())
        mask = torch.zeros(data.shape, dtype=torch.bool, device=data.device)
        self.put(mask, torch.ones(self.local_shape, dtype=torch.bool, device=data.device))
        return mask

    @property
    def local_shape(self) -> tuple[int, int]:
        rows, cols = local(self.param.detach()).shape[-2:]
        return (len(self.rows) if self.rows is not None else rows, cols)


def _tp(module: nn.Module, param: nn.Parameter) -> tuple[Split | None, dist.ProcessGroup | None, int]:
    if isinstance(param, DTensor):
        return _dtensor_split(param)
    if not getattr(param, "tensor_model_parallel", False):
        return None, None, 1
    group = getattr(module, "tp_group", None)
    size = group.size() if group is not None else 1
    if size == 1:
        return None, None, 1
    dim = getattr(param, "partition_dim", -1)
    if dim not in (0, 1):
        raise ValueError(
            f"nam_plasticity: tensor-parallel parameter with partition_dim={dim}; accepted 0 or 1"
        )
    return ("rows" if dim == 0 else "cols"), group, size


def _dtensor_split(param: DTensor) -> tuple[Split | None, dist.ProcessGroup | None, int]:
    mesh, placements = param.device_mesh, param.placements
    sharded = [(i, p) for i, p in enumerate(placements) if isinstance(p, Shard)]
    if not sharded:
        return None, None, 1
    if mesh.ndim != 1 or sharded[0][1].dim not in (0, 1, -1, -2) or param.dim() != 2:
        raise ValueError(
            f"nam_plasticity: DTensor weight {tuple(param.shape)} with placements {placements} on a "
            f"{mesh.ndim}-D mesh; accepted: a 2-D weight sharded on dim 0 or 1 of a 1-D mesh"
        )
    dim = sharded[0][1].dim % 2
    if param.shape[dim] % mesh.size() != 0:
        raise ValueError(
            f"nam_plasticity: DTensor weight {tuple(param.shape)} is unevenly sharded on dim {dim}"
        )
    return ("rows" if dim == 0 else "cols"), mesh.get_group(), mesh.size()


def _ranges(parts: dict[str, int]) -> dict[str, tuple[int, int]]:
    out, start = {}, 0
    for key, size in parts.items():
        out[key] = (start, start + size)
        start += size
    return out


def _qkv_rows(module: nn.Module, local_rows: int, tp: int) -> dict[str, torch.Tensor]:
    cfg = module.config
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    groups_local, q_per_group = groups // tp, heads // groups
    per_group = (q_per_group + 2) * head_dim
    if groups_local * per_group != local_rows:
        raise ValueError(
            f"nam_plasticity: linear_qkv has {local_rows} local rows; heads={heads}, query groups={groups}, "
            f"head dim={head_dim}, tp={tp} give {groups_local * per_group}"
        )
    base = torch.arange(groups_local)[:, None] * per_group
    q = (base + torch.arange(q_per_group * head_dim)).reshape(-1)
    k = (base + q_per_group * head_dim + torch.arange(head_dim)).reshape(-1)
    v = (base + (q_per_group + 1) * head_dim + torch.arange(head_dim)).reshape(-1)
    return {"q": q, "k": k, "v": v}


def _row_parts(
    module: nn.Module, parent: nn.Module | None, leaf: str, pname: str, local_rows: int, tp: int
) -> tuple[str, dict[str, torch.Tensor | None]]:
    """Row index sets of the parts of one local matrix, and the role of the matrix."""
    declared = getattr(parent, "plasticity_row_parts", None)
    parts = declared(f"{leaf}.{pname}") if callable(declared) else None
    if parts is not None:
        return "declared", {k: torch.as_tensor(list(rows), dtype=torch.long) for k, rows in parts.items()}
    if leaf == "linear_qkv":
        return "attn_qkv", _qkv_rows(module, local_rows, tp)
    if leaf == "linear_fc1":
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "gated_linear_unit", False):
            half = local_rows // 2
            return "mlp_fc1", {"gate": torch.arange(half), "up": torch.arange(half, local_rows)}
        return "mlp_fc1", {"all": None}
    if leaf == "in_proj" and parent is not None and hasattr(parent, "d_inner_local_tp"):
        p = parent
        sizes = {
            "z": p.d_inner_local_tp,
            "x": p.d_inner_local_tp,
            "B": p.ngroups_local_tp * p.d_state,
            "C": p.ngroups_local_tp * p.d_state,
            "dt": p.nheads_local_tp,
        }
        ranges = _ranges(sizes)
        if ranges["dt"][1] != local_rows:
            raise ValueError(f"nam_plasticity: Mamba in_proj has {local_rows} local rows, its parts {sizes}")
        return "mamba_in", {k: torch.arange(a, b) for k, (a, b) in ranges.items()}
    role = {"linear_proj": "attn_out", "linear_fc2": "mlp_fc2", "out_proj": "mixer_out"}.get(leaf, "linear")
    return role, {"all": None}


def _matrix_params(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, int | None]]:
    """(name, parameter, expert) of the weight matrices a linear-like module owns directly."""
    for pname, param in module.named_parameters(recurse=False):
        grouped = _GROUPED_WEIGHT.match(pname)
        param_local = local(param.detach())
        if (pname == "weight" and param.dim() == 2) or (grouped and param.dim() == 2):
            yield pname, param, None
        elif pname == "weight" and param.dim() == 3:
            for e in range(param_local.shape[0]):
                yield pname, param, e


def find_blocks(model_chunks: Iterable[nn.Module], mode: Mode = "all") -> list[Block]:
    """Every eligible logical block of the model chunks ("qk": attention Q and K only)."""
    if mode not in ("all", "qk"):
        raise ValueError(f"find_blocks: mode must be 'all' or 'qk', got {mode!r}")
    blocks: list[Block] = []
    for chunk in model_chunks:
        modules = dict(chunk.named_modules())
        names = global_names(chunk)
        for mname, module in modules.items():
            if "linear" not in type(module).__name__.lower() or _EXCLUDED_RE.search(mname):
                continue
            parent_name, _, leaf = mname.rpartition(".")
            parent = modules.get(parent_name)
            for pname, param, expert in _matrix_params(module):
                split, group, tp = _tp(module, param)
                local_rows, cols = local(param.detach()).shape[-2:]
                role, parts = _row_parts(module, parent, leaf, pname, local_rows, tp)
                for part, rows in parts.items():
                    if mode == "qk" and not (role == "attn_qkv" and part in ("q", "k")):
                        continue
                    n_rows = len(rows) if rows is not None else local_rows
                    shape = (
                        (n_rows * tp, cols)
                        if split == "rows"
                        else (n_rows, cols * tp)
                        if split
                        else (n_rows, cols)
                    )
                    label = f"{names[mname]}.{pname}" + (f"[{expert}]" if expert is not None else "")
                    label += f"[{part}]" if part != "all" else ""
                    blocks.append(
                        Block(
                            label,
                            f"{names[mname]}.{pname}",
                            param,
                            part,
                            role,
                            rows,
                            expert,
                            split,
                            group,
                            shape,
                        )
                    )
    return blocks

"""Logical blocks: the matrices an intervention acts on, which are not always whole tensors.

A fused qkv weight holds, per query group, the rows of its query heads, then one key head and
one value head; a SwiGLU fc1 holds the gate rows then the up rows (per tensor-parallel rank);
a Mamba in_proj holds [z, x, B, C, dt]; grouped experts hold one matrix per expert. Each of these
parts is its own block. Which parts a weight holds is read from the ``rows`` its modules declare
(``nam_plasticity.parts``: a module's own ``plasticity_parts()``, else the megatron rules).

A block on a tensor-parallel shard knows how its parameter is split ("rows" for a
column-parallel weight, "cols" for a row-parallel one), the group, and the gathered shape, so an
intervention can give the result it would give on the gathered weight. The row order of a
gathered part does not matter to FIRE, DASH or ReDo (each commutes with a row permutation).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from nam_plasticity import megatron
from nam_plasticity.naming import expert_indices, global_names
from nam_plasticity.params import local
from nam_plasticity.parts import RowParts, declarations

Split = Literal["rows", "cols"]
Mode = Literal["all", "qk"]


@dataclass(frozen=True)
class Block:
    """One logical matrix inside a parameter.

    rows: indices of the block's rows in the local matrix (None: all rows). expert: local index
    along ``expert_dim`` of a 3-D grouped parameter. split/group: how the parameter is split
    across tensor-parallel ranks (None: not split). global_shape: the gathered [rows, cols].
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
    expert_dim: int = 0

    def _local(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.expert is None else full.select(self.expert_dim, self.expert)

    def matrix(self, full: torch.Tensor) -> torch.Tensor:
        """The block's local matrix (a copy) from a tensor shaped like the parameter."""
        m = self._local(full)
        return m.index_select(0, self.rows.to(m.device)) if self.rows is not None else m.clone()

    def put(self, full: torch.Tensor, value: torch.Tensor) -> None:
        """Write the block's local matrix into a tensor shaped like the parameter, in place."""
        m = self._local(full)
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
        rows, cols = self._local(local(self.param.detach())).shape
        return (len(self.rows) if self.rows is not None else rows, cols)


def _tp(
    module: nn.Module,
    param: nn.Parameter,
    dims: tuple[int, int] = (0, 1),
    group: dist.ProcessGroup | None = None,
) -> tuple[Split | None, dist.ProcessGroup | None, int]:
    """How ``param`` is split: a DTensor by its placements, anything else by megatron's attributes."""
    if isinstance(param, DTensor):
        return _dtensor_split(param)
    return megatron.tensor_split(module, param, dims, group)


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


@dataclass(frozen=True)
class _Declared:
    """A parsed ``RowParts`` entry: row index sets per part, the expert axis, the group, the role."""

    parts: dict[str, torch.Tensor | None]
    expert_dim: int | None
    group: dist.ProcessGroup | None
    role: str


def _parse_row_parts(spec: Mapping, param: nn.Parameter, where: str) -> _Declared:
    unknown = set(spec) - set(RowParts.__annotations__)
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {sorted(unknown)}; accepted {sorted(RowParts.__annotations__)}"
        )
    shape = tuple(local(param.detach()).shape)
    expert_dim = spec.get("expert_dim")
    if (len(shape) == 3) != (expert_dim is not None) or expert_dim not in (None, 0, 1):
        raise ValueError(
            f"{where}: local shape {shape} with expert_dim={expert_dim}; accepted a 2-D weight without "
            "expert_dim or a 3-D weight with expert_dim 0 or 1 (input features last)"
        )
    group, role = spec.get("group"), str(spec.get("role", "declared"))
    rows = shape[1 if expert_dim == 0 else 0]
    parts = list(spec.get("parts") or ())
    repeat = int(spec.get("repeat", 1))
    if not parts:
        return _Declared({"all": None}, expert_dim, group, role)
    sizes = [int(size) for _, size in parts]
    period = sum(sizes)
    names = [str(name) for name, _ in parts]
    if len(set(names)) != len(names) or min(sizes) < 1 or repeat < 1 or period * repeat != rows:
        raise ValueError(
            f"{where}: parts {parts} x repeat {repeat} do not cover the {rows} local rows of {shape} "
            "(accepted: distinct names, sizes >= 1 summing to rows / repeat)"
        )
    base = torch.arange(repeat)[:, None] * period
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    index = {
        name: (base + offsets[i] + torch.arange(size)).reshape(-1)
        for i, (name, size) in enumerate(zip(names, sizes, strict=True))
    }
    return _Declared(index, expert_dim, group, role)


def _declared_rows(chunk: nn.Module, modules: dict[str, nn.Module]) -> dict[int, _Declared]:
    """id(parameter) -> its parsed ``rows`` entry; a module's own declaration wins over the
    megatron rules of the module holding the parameter."""
    ruled: dict[int, _Declared] = {}
    own: dict[int, _Declared] = {}
    for d in declarations(chunk):
        for path, spec in d.parts.get("rows", {}).items():
            owner_path, _, pname = f"{d.name}.{path}".strip(".").rpartition(".")
            param = getattr(modules.get(owner_path), "_parameters", {}).get(pname)
            where = f"{d.source}: rows[{path!r}]"
            if param is None:
                raise ValueError(f"{where}: no such parameter below the module")
            (own if d.own else ruled)[id(param)] = _parse_row_parts(spec, param, where)
    return ruled | own


def _blocks(
    label: str, module: nn.Module, param: nn.Parameter, d: _Declared, experts: list[int]
) -> Iterator[Block]:
    """The blocks of one declared parameter; ``experts`` maps local to global expert indices."""
    dims = (0, 1) if d.expert_dim is None else ((1, 2) if d.expert_dim == 0 else (0, 2))
    split, group, tp = _tp(module, param, dims, d.group)
    shape = local(param.detach()).shape
    local_rows, cols = shape[dims[0]], shape[dims[1]]
    for e in [None] if d.expert_dim is None else range(shape[d.expert_dim]):
        for part, rows in d.parts.items():
            n_rows = len(rows) if rows is not None else local_rows
            gathered = (n_rows * tp, cols) if split == "rows" else (n_rows, cols * tp)
            name = label + ("" if e is None else f"[{experts[e]}]") + ("" if part == "all" else f"[{part}]")
            yield Block(name, label, param, part, d.role, rows, e, split, group, gathered, d.expert_dim or 0)


def find_blocks(model_chunks: Iterable[nn.Module], mode: Mode = "all") -> list[Block]:
    """Every logical block the model chunks declare ("qk": attention Q and K only, i.e. parts
    ``q`` and ``k`` of role ``"attn_qkv"``); nothing below a router, an embedding or the output
    layer is a block."""
    if mode not in ("all", "qk"):
        raise ValueError(f"find_blocks: mode must be 'all' or 'qk', got {mode!r}")
    blocks: list[Block] = []
    for chunk in model_chunks:
        modules = dict(chunk.named_modules())
        names = global_names(chunk)
        declared = _declared_rows(chunk, modules)
        for mname, module in modules.items():
            if megatron.excluded(mname):
                continue
            for pname, param in module.named_parameters(recurse=False):
                d = declared.get(id(param))
                if d is None:
                    continue
                count = None if d.expert_dim is None else local(param.detach()).shape[d.expert_dim]
                experts = [] if count is None else expert_indices(modules, mname, count)
                blocks += [
                    b
                    for b in _blocks(f"{names[mname]}.{pname}".strip("."), module, param, d, experts)
                    if mode == "all" or (b.role == "attn_qkv" and b.part in ("q", "k"))
                ]
    return blocks

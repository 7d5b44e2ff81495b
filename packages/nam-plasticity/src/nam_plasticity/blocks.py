"""Logical blocks: the matrices an intervention acts on, which are not always whole tensors.

A fused qkv weight holds, per query group, the rows of its query heads, then one key head and
one value head; a SwiGLU fc1 holds the gate rows then the up rows (per tensor-parallel rank);
a Mamba in_proj holds [z, x, B, C, dt]; grouped experts hold one matrix per expert. Each of these
parts is its own block. Routers, embeddings and the output layer are never blocks.

A block on a tensor-parallel shard knows how its parameter is split ("rows" for a
column-parallel weight, "cols" for a row-parallel one), the group, and the gathered shape, so an
intervention can give the result it would give on the gathered weight. The row order of a
gathered part does not matter to FIRE, DASH or ReDo (each commutes with a row permutation).

A module whose weights hold several logical matrices declares them with a method
``plasticity_row_parts() -> Mapping[str, RowParts]`` (the declared-parts protocol, read before the
built-in rules below): per parameter path below the module (``"in_proj.weight"``,
``"fc1_weight"``), the ordered parts of its local rows with their sizes, how often that pattern
repeats (head-major layouts), the expert axis of a 3-D weight, and the tensor-parallel group
the weight is split over. Plain data, so a model package declares it without importing this
one. megatron-core's attention, MLP and Mamba modules are recognised by the built-in rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from nam_plasticity.naming import expert_indices, global_names
from nam_plasticity.params import local

Split = Literal["rows", "cols"]
Mode = Literal["all", "qk"]

EXCLUDED = ("router", "embedding", "output_layer")
_EXCLUDED_RE = re.compile(r"(^|\.)(" + "|".join(EXCLUDED) + r")(\.|$)")
_GROUPED_WEIGHT = re.compile(r"^weight(\d+)$")


class RowParts(TypedDict, total=False):
    """One parameter's entry in ``plasticity_row_parts()``; every key is optional.

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
    """

    parts: Sequence[tuple[str, int]]
    repeat: int
    expert_dim: int
    group: dist.ProcessGroup | None


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
    """How ``param`` is split: ``dims`` are its (row, column) axes; ``group`` overrides the
    module's ``tp_group``."""
    if isinstance(param, DTensor):
        return _dtensor_split(param)
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
    module: nn.Module, parent: nn.Module | None, leaf: str, local_rows: int, tp: int
) -> tuple[str, dict[str, torch.Tensor | None]]:
    """Built-in rules: row index sets of the parts of one local matrix, and the matrix's role."""
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


def _path(module_name: str, pname: str) -> str:
    return f"{module_name}.{pname}" if module_name else pname


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


@dataclass(frozen=True)
class _Declared:
    """A parsed ``RowParts`` entry: row index sets per part, the expert axis, the group."""

    parts: dict[str, torch.Tensor | None]
    expert_dim: int | None
    group: dist.ProcessGroup | None


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
    rows = shape[1 if expert_dim == 0 else 0]
    parts = list(spec.get("parts") or ())
    repeat = int(spec.get("repeat", 1))
    if not parts:
        return _Declared({"all": None}, expert_dim, spec.get("group"))
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
    return _Declared(index, expert_dim, spec.get("group"))


def _declarations(modules: dict[str, nn.Module]) -> dict[int, _Declared]:
    """id(parameter) -> its parsed declaration, from every module's ``plasticity_row_parts()``."""
    out: dict[int, _Declared] = {}
    for mname, module in modules.items():
        declare = getattr(module, "plasticity_row_parts", None)
        if not callable(declare):
            continue
        for path, spec in declare().items():
            owner_path, _, pname = f"{mname}.{path}".strip(".").rpartition(".")
            param = getattr(modules.get(owner_path), "_parameters", {}).get(pname)
            where = f"{type(module).__name__}.plasticity_row_parts()[{path!r}] at {mname or '<root>'}"
            if param is None:
                raise ValueError(f"{where}: no such parameter below the module")
            out[id(param)] = _parse_row_parts(spec, param, where)
    return out


def _declared_blocks(
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
            yield Block(
                name, label, param, part, "declared", rows, e, split, group, gathered, d.expert_dim or 0
            )


def find_blocks(model_chunks: Iterable[nn.Module], mode: Mode = "all") -> list[Block]:
    """Every eligible logical block of the model chunks ("qk": attention Q and K only).

    A declared parameter (``plasticity_row_parts``) is split as declared and never by the
    built-in rules, which split the other weights of linear modules; nothing below a router,
    an embedding or the output layer is a block.
    """
    if mode not in ("all", "qk"):
        raise ValueError(f"find_blocks: mode must be 'all' or 'qk', got {mode!r}")
    blocks: list[Block] = []
    for chunk in model_chunks:
        modules = dict(chunk.named_modules())
        names = global_names(chunk)
        declared = _declarations(modules)
        for mname, module in modules.items():
            if _EXCLUDED_RE.search(mname):
                continue
            if mode == "all":
                for pname, param in module.named_parameters(recurse=False):
                    d = declared.get(id(param))
                    if d is not None:
                        label = _path(names[mname], pname)
                        experts = (
                            []
                            if d.expert_dim is None
                            else expert_indices(modules, mname, local(param.detach()).shape[d.expert_dim])
                        )
                        blocks += _declared_blocks(label, module, param, d, experts)
            if "linear" not in type(module).__name__.lower():
                continue
            parent_name, _, leaf = mname.rpartition(".")
            parent = modules.get(parent_name)
            for pname, param, expert in _matrix_params(module):
                if id(param) in declared:
                    continue
                split, group, tp = _tp(module, param, (0, 1) if param.dim() == 2 else (1, 2))
                local_rows, cols = local(param.detach()).shape[-2:]
                role, parts = _row_parts(module, parent, leaf, local_rows, tp)
                for part, rows in parts.items():
                    if mode == "qk" and not (role == "attn_qkv" and part in ("q", "k")):
                        continue
                    n_rows = len(rows) if rows is not None else local_rows
                    shape = (n_rows * tp, cols) if split == "rows" else (n_rows, cols * tp)
                    label = _path(names[mname], pname) + (f"[{expert}]" if expert is not None else "")
                    label += f"[{part}]" if part != "all" else ""
                    blocks.append(
                        Block(
                            label,
                            _path(names[mname], pname),
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

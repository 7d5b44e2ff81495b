"""FIRE: replace each selected logical block by its polar factor scaled to sqrt(d_out / d_in).

The scale uses the gathered (unsharded) shape, so a block whose rows are all orthonormal
directions keeps the per-row norm an isometric layer of that shape has. Same-shape blocks (the
experts of a layer, the Q of every layer) run as one batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nam_plasticity.blocks import Block
from nam_plasticity.params import Master, local, resolve
from nam_plasticity.polar import Bulk, PolarResult, default_side, polar_factor
from nam_plasticity.records import Record


@dataclass(frozen=True)
class FireConfig:
    """tol / max_steps / bulk: see ``polar_factor``. max_batch_elements bounds one batch's size."""

    tol: float = 1e-3
    max_steps: int = 40
    bulk: Bulk = "bf16"
    max_batch_elements: int = 2**28


def fire_matrices(
    w: torch.Tensor, config: FireConfig = FireConfig(), **sharding: Any
) -> tuple[torch.Tensor, PolarResult]:
    """FIRE on a matrix or a batch of same-shape matrices: sqrt(d_out / d_in) * polar(w).

    ``sharding`` (side, global_shape, group) is passed to ``polar_factor`` for a shard.
    """
    rows, cols = sharding.get("global_shape") or tuple(w.shape[-2:])
    result = polar_factor(w, tol=config.tol, max_steps=config.max_steps, bulk=config.bulk, **sharding)
    return result.q * math.sqrt(rows / cols), result


def _side(block: Block) -> str:
    if block.split == "rows":
        return "in"
    if block.split == "cols":
        return "out"
    return default_side(*block.global_shape)


def _norm(x: torch.Tensor, block: Block) -> torch.Tensor:
    sq = x.float().square().sum(dim=(-2, -1))
    if block.group is not None:
        dist.all_reduce(sq, group=block.group)
    return sq.sqrt()


def apply_fire(
    step: int, blocks: Sequence[Block], optimizer: Any, config: FireConfig = FireConfig()
) -> list[Record]:
    """FIRE on every block; writes masters and model parameters, resets their optimizer state."""
    masters: dict[int, Master] = {}
    values: dict[int, torch.Tensor] = {}
    masks: dict[int, torch.Tensor] = {}
    remaining: dict[int, int] = defaultdict(int)
    batches: dict[tuple, list[Block]] = defaultdict(list)
    for b in blocks:
        key = id(b.param)
        remaining[key] += 1
        batches[(b.local_shape, b.global_shape, b.split, id(b.group), local(b.param).device)].append(b)

    records: list[Record] = []
    for group_blocks in batches.values():
        per_batch = max(1, config.max_batch_elements // math.prod(group_blocks[0].local_shape))
        for i in range(0, len(group_blocks), per_batch):
            chunk = group_blocks[i : i + per_batch]
            for b in chunk:
                key = id(b.param)
                if key not in masters:
                    masters[key] = resolve(b.param, optimizer)
                    values[key] = masters[key].read()
                    masks[key] = torch.zeros_like(values[key], dtype=torch.bool)
            w = torch.stack([b.matrix(values[id(b.param)]) for b in chunk])
            head = chunk[0]
            sharding = {"side": _side(head), "global_shape": head.global_shape, "group": head.group}
            out, result = fire_matrices(w, config, **sharding)
            before, after = _norm(w, head), _norm(out, head)
            for j, b in enumerate(chunk):
                key = id(b.param)
                b.put(values[key], out[j])
                masks[key] |= b.mask()
                records.append(
                    Record(
                        step=step,
                        kind="fire",
                        block=b.name,
                        tensors=[b.param_name],
                        rows=None if b.rows is None else b.rows.tolist(),
                        norm_before=float(before[j]),
                        norm_after=float(after[j]),
                        residual=float(result.residual[j]),
                        extra={
                            "steps_low_precision": result.steps_low_precision,
                            "steps_fp32": result.steps_fp32,
                            "converged": bool(result.residual[j] < config.tol),
                            "global_shape": list(b.global_shape),
                        },
                    )
                )
                remaining[key] -= 1
                if remaining[key] == 0:
                    masters[key].write(values.pop(key), masks[key])
                    masters[key].reset_state(masks.pop(key))
    return records

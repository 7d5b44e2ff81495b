"""DASH (direction-aware shrinking): shrink each output row by how well it points downhill.

Per output row w of a block, with g the gradient of that row (or its EMA):

    scale = clamp(cos(w, -g), lambda, 1),   w <- scale * w

A row aligned with the negative gradient (a feature the loss still wants) keeps its norm; a row
orthogonal or opposed to it (memorised noise, in the paper's analysis) shrinks to lambda of its
norm. A row whose gradient is zero (no signal, e.g. an expert that received no tokens) is left
alone. Paper: Shin et al., "DASH: Warm-Starting Neural Network Training in Stationary Settings
without Loss of Plasticity", NeurIPS 2024. Its code (github.com/baekrok/DASH-Direction-Aware-
SHrinking, ``utils/train_utils.py``) averages the gradient over mini-batches as
g <- (1 - alpha) g + alpha grad from g = 0, then scales each row by clamp(cos(w, -g), lambda, 1);
its defaults (``main.py``) are alpha = lambda = 0.3, ours too. Here the average runs over plan
steps (one gradient per optimizer step; alpha = None uses the current gradient alone).

Gradients: megatron's ``main_grad`` (data-parallel reduced) when present, else ``.grad``. Under
the distributed optimizer only the slice a rank owns is reduced, so each rank forms per-row
partial sums of w.g, w.w and g.g over its slice and the sums are added across the
data-parallel group (and across tensor-parallel ranks for a row-parallel weight, whose rows are
split by column). The scales are then the same everywhere and each rank writes its own slice of
the fp32 master and the whole model parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from nam_plasticity.blocks import Block
from nam_plasticity.params import Master, local, resolve
from nam_plasticity.records import Record


@dataclass
class DashConfig:
    """lam: the floor of the per-row scale. alpha: weight of the newest gradient in the gradient's
    moving average (None: no average). Defaults: the paper's code, lambda = alpha = 0.3."""

    lam: float = 0.3
    alpha: float | None = 0.3

    def __post_init__(self) -> None:
        if not 0 <= self.lam <= 1:
            raise ValueError(f"DashConfig.lam must be in [0, 1], got {self.lam}")
        if self.alpha is not None and not 0 < self.alpha <= 1:
            raise ValueError(f"DashConfig.alpha must be in (0, 1] or None, got {self.alpha}")


def dash_scale(w: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-row DASH scale of a [rows, cols] weight and gradient (reference formula)."""
    return _scale((w * g).sum(-1), w.square().sum(-1), g.square().sum(-1), lam)


def _scale(wg: torch.Tensor, ww: torch.Tensor, gg: torch.Tensor, lam: float) -> torch.Tensor:
    cos = -wg / (ww.sqrt() * gg.sqrt()).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(gg > 0, cos.clamp(lam, 1.0), torch.ones_like(cos))


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    g = getattr(param, "main_grad", None)
    g = param.grad if g is None else g
    if g is None:
        raise ValueError(f"DASH: parameter of shape {tuple(param.shape)} has neither main_grad nor grad")
    return g


@dataclass
class Dash:
    """DASH with an optional gradient EMA kept over the slice of each parameter a rank owns."""

    config: DashConfig = field(default_factory=DashConfig)
    ema: dict[int, torch.Tensor] = field(
        default_factory=dict, repr=False
    )  # by id(param): the owned slice, flat

    def observe(self, blocks: Sequence[Block], optimizer: Any) -> None:
        """Fold the current gradients into the EMA; the plan calls it every step when alpha is set."""
        if self.config.alpha is None:
            return
        for param in {id(b.param): b.param for b in blocks}.values():
            g = _owned_grad(resolve(param, optimizer))
            ema = self.ema.get(id(param))
            a = self.config.alpha
            self.ema[id(param)] = g.mul_(a) if ema is None else ema.mul_(1 - a).add_(g, alpha=a)  # from g = 0

    def apply(self, step: int, blocks: Sequence[Block], optimizer: Any) -> list[Record]:
        records: list[Record] = []
        by_param: dict[int, list[Block]] = {}
        for b in blocks:
            by_param.setdefault(id(b.param), []).append(b)
        for param_blocks in by_param.values():
            param = param_blocks[0].param
            master = resolve(param, optimizer)
            g = self.ema.get(id(param)) if self.config.alpha is not None else None
            g = _owned_grad(master) if g is None else g
            w_full = master.read() if not master.sharded else None
            w = (w_full if w_full is not None else _owned_weight(master)).reshape(-1)
            data = master.tensor
            cols = data.shape[-1]
            start = master.shard[0] if master.sharded else 0
            row = torch.arange(start, start + w.numel(), device=w.device) // cols
            n_rows = data.numel() // cols
            sums = torch.zeros(3, n_rows, dtype=torch.float32, device=w.device)
            sums[0].index_add_(0, row, w * g)
            sums[1].index_add_(0, row, w * w)
            sums[2].index_add_(0, row, g * g)
            if master.sharded:
                dist.all_reduce(sums, group=master.group)
            split_cols = [b for b in param_blocks if b.split == "cols"]
            if split_cols:
                dist.all_reduce(sums, group=split_cols[0].group)
            scale = _scale(sums[0], sums[1], sums[2], self.config.lam).view(data.shape[:-1])
            value = w_full if w_full is not None else master.read()
            before = value.clone()
            mask = torch.zeros(data.shape, dtype=torch.bool, device=data.device)
            for b in param_blocks:
                mask |= b.mask()
            mask &= (scale < 1)[..., None]  # rows kept at scale 1 are untouched, state included
            value = torch.where(mask, value * scale[..., None], value)
            master.write(value, mask)
            master.reset_state(mask)
            for b in param_blocks:
                s = b.matrix(scale[..., None]).reshape(-1)
                nb, na = _block_norm(b, before), _block_norm(b, value)
                records.append(
                    Record(
                        step=step,
                        kind="dash",
                        block=b.name,
                        tensors=[b.param_name],
                        rows=torch.nonzero(s < 1).reshape(-1).tolist(),
                        norm_before=nb,
                        norm_after=na,
                        extra={
                            "scale_mean": float(s.mean()),
                            "scale_min": float(s.min()),
                            "lam": self.config.lam,
                        },
                    )
                )
        return records


def _owned_grad(master: Master) -> torch.Tensor:
    return master.owned(local(_grad(master.param).detach())).float().reshape(-1).clone()


def _owned_weight(master: Master) -> torch.Tensor:
    if master.main is not None:
        return master.main.detach().float()
    if master.shard is not None:
        return master.tensor.reshape(-1)[master.shard[0] : master.shard[1]].float()
    return master.tensor.float()


def _block_norm(block: Block, full: torch.Tensor) -> float:
    sq = block.matrix(full).float().square().sum()
    if block.group is not None:
        dist.all_reduce(sq, group=block.group)
    return float(sq.sqrt())

"""Where an edit must land: the fp32 master of a parameter (or the shard this rank owns) and the
model parameter, for the touched entries only, plus the optimizer state of those entries.

megatron-core's mixed-precision optimizers keep an fp32 master per bf16 parameter and copy it
over the model parameter at every step, so an edit to the model parameter alone is undone at
the next step. Three cases, told apart by the optimizer that owns the parameter:

- a torch optimizer, or megatron's FP32Optimizer: the model parameter is its own master;
- megatron's Float16OptimizerWithFloat16Params: ``param.main_param`` is a full fp32 copy;
- megatron's DistributedOptimizer: ``param.main_param`` is the flat fp32 slice
  ``[start, end)`` of the flattened parameter that this data-parallel rank owns (None when it
  owns none); the other ranks of its data-parallel group own the rest. For fp32 parameters the
  owned slice is a view of the model parameter itself.

Edits are written as (new fp32 value, boolean mask of touched entries). Untouched entries of
the master and of the model parameter are never written, so they stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class Master:
    """A model parameter and its fp32 master.

    main: the fp32 master (full, or this rank's flat shard), None when the model parameter is its
    own master. shard: (start, end) of the flattened parameter that ``main`` covers when sharded.
    group: the data-parallel group the shards are spread over. optimizer: the torch optimizer
    holding the state of ``state_key``, the tensor the optimizer steps.
    """

    param: torch.nn.Parameter
    main: torch.Tensor | None
    shard: tuple[int, int] | None
    group: dist.ProcessGroup | None
    optimizer: torch.optim.Optimizer | None
    state_key: torch.Tensor | None

    @property
    def sharded(self) -> bool:
        return self.shard is not None

    @property
    def tensor(self) -> torch.Tensor:
        """The model parameter's data on this rank (a DTensor's local shard)."""
        return local(self.param.detach())

    def read(self) -> torch.Tensor:
        """The full fp32 master value (gathered over the data-parallel group when sharded)."""
        if self.shard is None:
            src = self.main if self.main is not None else self.tensor
            return local(src).float().clone()
        # Each rank contributes its own slice into zeros; adding zeros is exact.
        flat = torch.zeros(self.tensor.numel(), dtype=torch.float32, device=self.tensor.device)
        if self.main is not None:
            flat[self.shard[0] : self.shard[1]] = self.main.detach().float()
        elif self.tensor.dtype == torch.float32:
            flat[self.shard[0] : self.shard[1]] = self.tensor.view(-1)[self.shard[0] : self.shard[1]]
        dist.all_reduce(flat, group=self.group)
        return flat.view_as(self.tensor)

    def owned(self, full: torch.Tensor) -> torch.Tensor:
        """The part of a full-shaped tensor that this rank's master covers (flat when sharded)."""
        return full if self.shard is None else full.reshape(-1)[self.shard[0] : self.shard[1]]

    @torch.no_grad()
    def write(self, value: torch.Tensor, mask: torch.Tensor) -> None:
        """Write ``value`` (fp32, the parameter's shape) where ``mask`` (broadcastable) is True."""
        data = self.tensor
        mask = mask.expand_as(data)
        value = value.to(torch.float32)
        if self.main is not None:
            main = local(self.main)
            main.copy_(torch.where(self.owned(mask), self.owned(value).to(main.dtype), main))
        data.copy_(torch.where(mask, value.to(data.dtype), data))

    @torch.no_grad()
    def reset_state(self, mask: torch.Tensor) -> int:
        """Zero the optimizer state of the masked entries; returns how many state tensors it touched.

        Per-parameter step counters are left alone: they are shared by every row, and with bias
        correction near 1 a zeroed row restarts as a fresh Adam row would after warm-up.
        """
        if self.optimizer is None or self.state_key is None:
            return 0
        state = self.optimizer.state.get(self.state_key)
        if not state:
            return 0
        m = self.owned(mask.expand_as(self.tensor))
        touched = 0
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == self.state_key.shape:
                value = local(value)
                value.masked_fill_(m.view_as(value), 0)
                touched += 1
        return touched


def _megatron_parts(optimizer: Any) -> list[Any]:
    """The leaf optimizers of a megatron ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"nam_plasticity: optimizer {type(optimizer).__name__} holds no torch optimizer; accepted: a "
            "torch.optim.Optimizer or megatron-core's FP32Optimizer, Float16OptimizerWithFloat16Params, "
            "DistributedOptimizer and ChainedOptimizer of those"
        )
    return inner


def resolve(param: torch.nn.Parameter, optimizer: Any | None) -> Master:
    """Find the fp32 master and optimizer state of ``param`` under ``optimizer`` (may be None)."""
    if optimizer is None:
        return Master(param, None, None, None, None, None)
    if isinstance(optimizer, torch.optim.Optimizer):
        return Master(param, None, None, None, optimizer, param)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for part in _megatron_parts(optimizer):
        if getattr(part, "is_stub_optimizer", False):
            continue  # a rank with no parameters in this optimizer
        inner = _torch_optimizer(part)
        if isinstance(part, DistributedOptimizer):
            if not any(param in buffer.param_index_map for buffer in part.buffers):
                continue
            entry = part.model_param_gbuf_map.get(param)  # only parameters this rank owns a slice of
            if entry is None:
                return Master(param, None, (0, 0), part.data_parallel_group, inner, None)
            gi, dtype, bi = entry
            rng = part.gbuf_ranges[gi][dtype][bi]["param_map"][param]["param"]
            g, order = part.model_param_group_index_map[param]
            key = inner.param_groups[g]["params"][order]
            main = getattr(param, "main_param", None)
            return Master(param, main, (rng.start, rng.end), part.data_parallel_group, inner, key)
        if isinstance(part, Float16OptimizerWithFloat16Params):
            for model_group, main_group in zip(
                part.float16_groups, part.fp32_from_float16_groups, strict=True
            ):
                for model_param, main_param in zip(model_group, main_group, strict=True):
                    if model_param is param:
                        return Master(param, main_param, None, None, inner, main_param)
            if any(param is p for group in part.fp32_from_fp32_groups for p in group):
                return Master(param, None, None, None, inner, param)
            continue
        if any(param is p for group in inner.param_groups for p in group["params"]):
            return Master(param, None, None, None, inner, param)
    raise KeyError(
        f"nam_plasticity: parameter of shape {tuple(param.shape)} is not among the optimizer's parameters; "
        "pass the optimizer that steps the model chunks the blocks came from"
    )

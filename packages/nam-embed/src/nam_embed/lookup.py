"""Table lookups whose gradient goes straight into megatron DDP's main-gradient buffer.

A large table's plain backward makes a dense table-sized gradient per micro-batch, which DDP's hook
then adds to ``main_grad``: two passes over the whole table for the few rows a batch touches. Where
the table has a ``main_grad``, the backward adds the touched rows into it instead and marks
``grad_added_to_main_grad``, as megatron's linear layers do with gradient_accumulation_fusion.
Every use of such a table must then go through ``embedding`` (the hook skips the table's ``.grad``
once the flag is set). Torch only: megatron's DDP sets the attributes this reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["embedding"]


def embedding(indices: Tensor, weight: Tensor) -> Tensor:
    """``F.embedding(indices, weight)``; its backward accumulates into ``weight.main_grad`` when the
    weight has one (megatron's DDP), and is F.embedding's own otherwise."""
    if hasattr(weight, "main_grad") and torch.is_grad_enabled() and weight.requires_grad:
        return _IntoMainGrad.apply(indices, weight)
    return F.embedding(indices, weight)


class _IntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, indices: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(indices, weight)
        # in ctx, not saved: the buffer is written in place by every use before this backward
        ctx.main_grad = weight.main_grad
        return F.embedding(indices, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        indices, weight = ctx.saved_tensors
        main_grad = ctx.main_grad
        main_grad.index_add_(0, indices.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(main_grad.dtype))
        weight.grad_added_to_main_grad = True
        # A gradient must still reach the weight so that DDP's hook runs (it marks the bucket
        # ready); the hook discards it. Zeros where megatron asks for them (zero_out_wgrad: a weight
        # whose other uses return a real gradient the hook adds).
        make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
        return None, make(weight.shape, dtype=weight.dtype, device=weight.device)

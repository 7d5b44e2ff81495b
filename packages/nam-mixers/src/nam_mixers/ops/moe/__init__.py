"""The experts' elementwise ops, around which nam-spec's local MoE runs: a Triton kernel each
(``kernels.py``) and its PyTorch reference (``reference.py``), on the path
nam_mixers.ops.triton_paths resolves ("auto": the kernel on CUDA)."""

from __future__ import annotations

from typing import Any

import torch

from nam_mixers.ops.moe.reference import sum_pairs_reference, weighted_swiglu_reference
from nam_mixers.ops.triton_paths import PATHS, resolve_triton_path

__all__ = ["PATHS", "sum_pairs", "weighted_swiglu"]


def weighted_swiglu(h: torch.Tensor, probs: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """h [T, 2F] (each row its gate, then its up columns), probs [T] -> silu(gate) * up * probs [T, F],
    in h's dtype; differentiable in h and probs."""
    if resolve_triton_path("moe op", path, h.device) == "triton":
        return _WeightedSwiGLU.apply(h, probs)
    return weighted_swiglu_reference(h, probs)


def sum_pairs(rows: torch.Tensor, inverse: torch.Tensor, top_k: int, path: str = "auto") -> torch.Tensor:
    """[T, hidden]: row t sums ``rows[inverse[t * top_k + j]]`` over j < top_k (a token's expert
    outputs, found through the inverse of the expert-sorted permutation), in rows' dtype. Not
    differentiable: nam-spec's local dispatcher writes its adjoint."""
    if resolve_triton_path("moe op", path, rows.device) == "triton":
        from nam_mixers.ops.moe.kernels import sum_pairs as kernel

        return kernel(rows.contiguous(), inverse.contiguous(), top_k)
    return sum_pairs_reference(rows, inverse, top_k)


class _WeightedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        from nam_mixers.ops.moe.kernels import swiglu_forward

        h, probs = h.contiguous(), probs.contiguous()
        ctx.save_for_backward(h, probs)
        return swiglu_forward(h, probs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from nam_mixers.ops.moe.kernels import swiglu_backward

        h, probs = ctx.saved_tensors
        return swiglu_backward(h, probs, grad.contiguous())

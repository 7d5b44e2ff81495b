"""The experts' elementwise ops in PyTorch: what the Triton kernels (``kernels.py``) compute, and
the path off CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_swiglu_reference(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """h [T, 2F] (gate columns, then up), probs [T] -> silu(gate) * up * probs, [T, F] in h's dtype."""
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate) * up * probs.unsqueeze(-1)).to(h.dtype)


def sum_pairs_reference(rows: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, hidden]: row t sums ``rows[inverse[t * top_k + j]]`` over j < top_k, in rows' dtype."""
    return rows.index_select(0, inverse).view(-1, top_k, rows.shape[-1]).sum(1)

"""The short causal depthwise convolution in plain PyTorch, with document resets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """x [b, l, d], weight [d, width], bias [d] -> [b, l, d], before the activation.

    out[t] = bias + sum_j weight[:, width - 1 - j] * x[t - j]; a term that reaches back into an
    earlier document (seq_idx[t - j] != seq_idx[t]) is dropped, which is what causal-conv1d does
    with seq_idx. Without documents that is one depthwise conv; with them, width shifted products
    so that the mask applies per term.
    """
    seqlen, width = x.shape[1], weight.shape[1]
    if seq_idx is None:
        out = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=width - 1, groups=x.shape[-1])
        return out[..., :seqlen].transpose(1, 2)
    out = x * weight[:, -1] + bias
    for j in range(1, min(width, seqlen)):
        shifted = F.pad(x[:, : seqlen - j], (0, 0, j, 0))
        same = F.pad(seq_idx[:, j:] == seq_idx[:, :-j], (j, 0), value=False)
        out = out + shifted * same[..., None] * weight[:, width - 1 - j]
    return out

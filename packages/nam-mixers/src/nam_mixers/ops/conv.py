"""The short causal depthwise convolution with document resets: causal-conv1d's CUDA op where it
imports and the tensors are on CUDA, and a plain PyTorch version that defines the semantics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nam_mixers.ops.imports import import_error


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


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seq_idx: torch.Tensor | None
) -> torch.Tensor:
    """SiLU(causal_conv1d_torch(...)), by causal-conv1d's CUDA op where it can run.

    x may be a channel slice [b, l, d] of a batch-major projection output: the op reads that
    channels-last layout as it is when the time stride is a multiple of 8. Anything else (a
    sequence-first tensor transposed to batch-first included) is copied once to batch-major.
    """
    if not (x.is_cuda and import_error("causal_conv1d") is None):
        return F.silu(causal_conv1d_torch(x, weight, bias, seq_idx))
    from causal_conv1d import causal_conv1d_fn

    batch_major = x.shape[0] == 1 or x.stride(0) >= x.shape[1] * x.stride(1)
    if x.stride(2) != 1 or x.stride(1) % 8 or not batch_major:  # the channels-last kernel's layout
        x = x.contiguous()
    return causal_conv1d_fn(x.transpose(1, 2), weight, bias, seq_idx=seq_idx, activation="silu").transpose(
        1, 2
    )


def conv_state(x: torch.Tensor, seq_idx: torch.Tensor | None, width: int) -> torch.Tensor:
    """What the next step's conv reads of the past: the last ``width - 1`` inputs [b, width - 1, d],
    zero where they lie before the row or in an earlier document than the last token's."""
    seqlen = x.shape[1]
    keep = min(width - 1, seqlen)
    past = x[:, seqlen - keep :]
    if seq_idx is not None:
        same = seq_idx[:, seqlen - keep :] == seq_idx[:, -1:]
        past = past * same[..., None].to(past.dtype)
    return F.pad(past, (0, 0, width - 1 - keep, 0))


def causal_conv1d_step(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of causal_conv1d_torch: x [b, d] with the last width - 1 inputs ``state``
    [b, width - 1, d] -> (output [b, d] before the activation, the next state)."""
    window = torch.cat([state, x[:, None]], dim=1)  # [b, width, d]: oldest first, as weight's columns
    return (window * weight.t()).sum(1) + bias, window[:, 1:]

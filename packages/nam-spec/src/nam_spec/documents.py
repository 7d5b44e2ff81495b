"""Document boundaries of a packed micro-batch: ``document_ids`` [b, s] -> megatron's PackedSeqParams.

A micro-batch of b packed rows of s tokens is described as segments of its b * s tokens flattened
row by row (cu_seqlens, int32, 0 first and b * s last): a new segment starts at every row start,
wherever the document id changes, and at every pad token (id < 0), which is a segment of its own
so that it never attends or is attended to across. Every letter reads this one description:
attention as its variable-length segments, Mamba and M2RNN (state and convolutions) as
``segment_ids``. ``qkv_format`` stays unset: activations keep their [s, b, h] layout (megatron's
"thd" would squeeze b, which must stay a batch here for the recurrent kernels' parallelism), and
RoPE, being relative, needs no restart inside the block-causal attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def document_boundaries(
    document_ids: torch.Tensor, device: torch.device | str | None = None
) -> PackedSeqParams:
    """Segments of the micro-batch ``document_ids`` [b, s] (integers, < 0 on pad), cu_seqlens on
    ``device`` (default: where the ids are). The number of segments depends on the data, so this
    reads it back: on CUDA ids that is one host sync; the trainer passes its CPU copy of the ids."""
    if document_ids.dim() != 2 or document_ids.dtype.is_floating_point or document_ids.is_complex():
        raise ValueError(
            f"document_boundaries: document_ids must be an integer tensor [batch, seq], "
            f"got {document_ids.dtype} {tuple(document_ids.shape)}"
        )
    b, s = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]) | (document_ids[:, 1:] < 0)
    first = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([first, first.new_full((1,), b * s)]).to(device=device, dtype=torch.int32)
    # the longest segment is at most s: an upper bound the kernels accept, and no second sync
    return PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=s, max_seqlen_kv=s)


def has_boundaries(document_ids: torch.Tensor) -> bool:
    """Whether any row of ``document_ids`` [b, s] holds a document start after its first token or a
    pad token. When none does, every row is one piece of one document, plain causal attention and
    unbroken scans are already exact, and the faster causal kernels can run (the trainer then passes
    no boundaries). Reads the ids: call it on their CPU copy."""
    return bool((document_ids[:, 1:] != document_ids[:, :-1]).any() or (document_ids < 0).any())


def segment_ids(params: PackedSeqParams, b: int, s: int, device: torch.device) -> torch.Tensor:
    """Segment index per token [b, s] (int32, non-decreasing along each row) of ``params``,
    the micro-batch's b rows of s tokens; what nam-mixers take as ``seq_idx``. Every M and R layer
    of the micro-batch asks for the same ids: made once, they are handed out again (``derived``)."""
    cu = params.cu_seqlens_q
    if cu is None or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            "packed_seq_params.cu_seqlens_q must be a 1-d tensor [segments + 1] (document_boundaries)"
        )

    def make() -> torch.Tensor:
        if cu.device.type == "cpu" and int(cu[-1]) != b * s:  # free to check where no device sync is paid
            raise ValueError(
                f"packed_seq_params covers {int(cu[-1])} tokens but the micro-batch has {b} x {s} = {b * s}"
            )
        pos = torch.arange(b * s, device=device, dtype=torch.int32)
        ends = cu.to(device=device, dtype=torch.int32)[1:]
        return torch.searchsorted(ends, pos, right=True).to(torch.int32).view(b, s)

    return derived(params, ("segment_ids", b, s, torch.device(device)), make)


def derived(params: PackedSeqParams, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, made once per ``params`` and ``key`` and kept on ``params``: what the layers derive
    from a micro-batch's boundaries is the same in every layer, and ``params`` lives as long as the
    micro-batch (recomputation in backward gets the same object). The tensor is handed out only
    while ``params.cu_seqlens_q`` is the one it was made from."""
    kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = params.__dict__.setdefault(_DERIVED, {})
    cu = params.cu_seqlens_q
    entry = kept.get(key)
    if entry is None or entry[0] is not cu:
        entry = kept[key] = (cu, make())
    return entry[1]


_DERIVED = "_nam_derived"  # the attribute of a PackedSeqParams holding what ``derived`` made of it

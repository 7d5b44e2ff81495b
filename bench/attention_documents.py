"""Core attention with document boundaries against plain causal attention at NAM56R width.

    NAM_COMMIT=<sha> bash bench/gpu.sh attention_documents

nam-spec's ``SDPAttention`` (the local backend's core attention) at NAM56R width: 56 query heads,
8 KV heads, head dim 64, bf16, sequence 4096, micro-batch 1 and 4; forward+backward of q, k, v
[s, b, heads, 64] -> [s, b, 56 x 64]. ``causal``: plain causal SDPA (flash), what the model runs
without boundaries. ``documents``: the same module given ``nam_spec.documents.document_boundaries``
of packed rows whose document lengths follow the default corpus (bench/document_lengths.json:
C++ standard headers under the tiny preset's tokenizer, drawn with replacement and laid out as the
packer does, rows starting mid-document), which runs torch's variable-length flash kernel. Rows
report the time, the segments per micro-batch and the causal attention FLOPs kept (the sum over
segments of l^2 against s^2 per row): the kernel skips the blocks between documents, so it can be
faster than causal.

Checks first, on a shorter micro-batch (2 x 1024, same head geometry): the varlen output and the
gradients of q, k and v against each document run alone through plain causal SDPA in float32 on
the same bf16 inputs, beside the causal kernel's own bf16 error against float32 (the error floor
of bf16 flash); the pad tail is one-token segments.
"""

from __future__ import annotations

from functools import partial
from itertools import pairwise
from typing import Any

from bench.document_lengths import load_lengths, packed_document_ids
from bench.report import Report
from bench.world import one_rank_world

SEQ = 4096
MICRO_BATCHES = (1, 4)
HEADS, KV_HEADS, HEAD_DIM = 56, 8, 64
CHECK_BATCH, CHECK_SEQ, CHECK_PAD = 2, 1024, 37
TOL = 2e-2  # relative to the largest reference value, bf16


def _attention(seq: int) -> Any:
    from megatron.core.transformer.enums import AttnMaskType

    from nam_layout import Layout
    from nam_spec.local.attention import SDPAttention
    from nam_spec.presets import preset
    from nam_spec.transformer_config import transformer_config

    config = preset("nam56r", params_dtype="bfloat16", recompute="none", seq_length=seq)
    tc = transformer_config(config, Layout.tile("A", 1), letter="A")
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (HEADS, KV_HEADS, HEAD_DIM)
    return SDPAttention(tc, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def _qkv(b: int, s: int, seed: int = 0) -> tuple[Any, Any, Any]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(
        torch.randn(s, b, h, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        for h in (HEADS, KV_HEADS, KV_HEADS)
    )


def _document_ids(b: int, s: int, pad: int = 0) -> Any:
    import torch

    ids = torch.from_numpy(packed_document_ids(load_lengths(), b, s))
    if pad:
        ids[-1, -pad:] = -1  # the split's last row ends in pad
    return ids


def _alone(q: Any, k: Any, v: Any, ids: Any) -> Any:
    """Each segment (pad tokens alone) through plain causal SDPA in float32: [s, b, heads x dim]."""
    import torch
    import torch.nn.functional as F

    from nam_spec.documents import document_boundaries

    s, b = q.shape[:2]
    cu = document_boundaries(ids).cu_seqlens_q.tolist()
    out = torch.empty(s, b, HEADS * HEAD_DIM, device=q.device)
    for start, end in pairwise(cu):
        row, a, e = start // s, start % s, start % s + end - start
        seg = [t[a:e, row].float().transpose(0, 1)[None] for t in (q, k, v)]  # [1, heads, l, dim]
        o = F.scaled_dot_product_attention(*seg, is_causal=True, scale=HEAD_DIM**-0.5, enable_gqa=True)
        out[a:e, row] = o[0].transpose(0, 1).reshape(e - a, HEADS * HEAD_DIM)
    return out


def _forward_backward(attn: Any, q: Any, k: Any, v: Any, grad: Any, params: Any) -> tuple[Any, ...]:
    import torch

    out = attn(q, k, v, None, packed_seq_params=params)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _rel(a: Any, ref: Any) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _check(report: Report) -> None:
    import torch
    import torch.nn.functional as F

    from nam_spec.documents import document_boundaries

    attn = _attention(CHECK_SEQ)
    q, k, v = _qkv(CHECK_BATCH, CHECK_SEQ, seed=1)
    ids = _document_ids(CHECK_BATCH, CHECK_SEQ, pad=CHECK_PAD)
    grad = torch.randn(CHECK_SEQ, CHECK_BATCH, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    got = _forward_backward(attn, q, k, v, grad, document_boundaries(ids, "cuda"))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out = _alone(qf, kf, vf, ids)
    ref = (ref_out, *torch.autograd.grad(ref_out, (qf, kf, vf), grad.float()))
    for name, a, r in zip(("output", "dq", "dk", "dv"), got, ref, strict=True):
        report.check(
            f"documents {CHECK_BATCH}x{CHECK_SEQ}: varlen bf16 {name} vs each document alone fp32",
            _rel(a, r),
            TOL,
        )
    # the bf16 flash error floor: the plain causal kernel against float32, same inputs
    with torch.no_grad():
        causal = attn(q, k, v, None)
        full = F.scaled_dot_product_attention(
            *(t.float().permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True, enable_gqa=True
        )
    report.check(
        f"causal {CHECK_BATCH}x{CHECK_SEQ}: flash bf16 output vs fp32 (error floor)",
        _rel(causal, full.permute(2, 0, 1, 3).reshape_as(causal)),
        TOL,
    )


def main(report: Report) -> None:
    with one_rank_world():
        _bench(report)


def _bench(report: Report) -> None:
    import torch

    from nam_spec.documents import document_boundaries

    _check(report)
    attn = _attention(SEQ)
    for b in MICRO_BATCHES:
        q, k, v = _qkv(b, SEQ)
        grad = torch.randn(SEQ, b, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        ids = _document_ids(b, SEQ)
        params = document_boundaries(ids, "cuda")
        lengths = (params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).double()
        kept = float((lengths**2).sum()) / (b * SEQ**2)
        causal_ms = report.time(
            f"causal b{b} s{SEQ} {HEADS}/{KV_HEADS}x{HEAD_DIM} fwd+bwd",
            partial(_forward_backward, attn, q, k, v, grad, None),
        )
        docs_ms = report.time(
            f"documents b{b} s{SEQ} {HEADS}/{KV_HEADS}x{HEAD_DIM} fwd+bwd",
            partial(_forward_backward, attn, q, k, v, grad, params),
            segments=len(lengths),
            kept_fraction=kept,
        )
        report.row(f"documents / causal b{b}", ratio=docs_ms / causal_ms, kept_fraction=kept)
        print(
            f"b{b}: causal {causal_ms:.3f} ms, documents {docs_ms:.3f} ms ({docs_ms / causal_ms:.2f}x; "
            f"{len(lengths)} segments, {100 * kept:.0f}% of the causal FLOPs kept)",
            flush=True,
        )

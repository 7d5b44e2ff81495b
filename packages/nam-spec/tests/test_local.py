"""The local backend's own modules against plain-torch references."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from nam_layout import Layout
from nam_spec.config import ParallelConfig
from nam_spec.local import GroupedExperts, RMSNorm, SDPAttention, grouped_linear
from nam_spec.local.experts import grouped_mm_runs
from nam_spec.transformer_config import transformer_config


def _tc(parallel: ParallelConfig | None = None):
    return transformer_config(tiny(), Layout.tile("AE", 2), parallel)


def test_rmsnorm_matches_formula_and_marks_sequence_parallel() -> None:
    norm = RMSNorm(_tc(), 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 2, 32)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref)
    assert norm.weight.sequence_parallel is False
    sp = RMSNorm(_tc(ParallelConfig(tensor=2, sequence_parallel=True)), 32)
    assert sp.weight.sequence_parallel is True  # megatron sums its gradient over TP


def _reference_attention(q, k, v, mask):  # [s, b, heads, d]; explicit softmax, GQA by repeat
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def test_sdpa_attention_causal_gqa_matches_reference() -> None:
    attn = SDPAttention(_tc(), 1, AttnMaskType.causal, "self")
    s, b = 7, 2
    q = torch.randn(s, b, 4, 8, dtype=torch.float64)
    k, v = torch.randn(s, b, 2, 8, dtype=torch.float64), torch.randn(s, b, 2, 8, dtype=torch.float64)
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(q, k, v, None), _reference_attention(q, k, v, mask))


def test_sdpa_attention_packed_rows_do_not_attend_across_documents() -> None:
    attn = SDPAttention(_tc(), 1, AttnMaskType.causal, "self")
    q, k, v = (torch.randn(8, 1, n, 8, dtype=torch.float64) for n in (4, 2, 2))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    out = attn(q, k, v, None, packed_seq_params=PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_kv=cu))
    for a, b in ((0, 3), (3, 8)):  # each document alone gives the same rows
        ref = attn(q[a:b], k[a:b], v[a:b], None)
        torch.testing.assert_close(out[a:b], ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_matches_per_expert_loop(dtype: torch.dtype) -> None:
    counts = torch.tensor([3, 0, 5, 4])  # an empty expert included
    x = torch.randn(12, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 8, 16, dtype=dtype, requires_grad=True)
    assert grouped_mm_runs(x, w) == (dtype == torch.float32)  # float64: the loop fallback
    out = grouped_linear(x, w, counts)
    ref = torch.cat([xe @ we.T for xe, we in zip(torch.split(x, counts.tolist()), w, strict=True)])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_grouped_mm_refuses_misaligned_rows() -> None:
    x, w = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(2, 8, 6, dtype=torch.bfloat16)
    assert not grouped_mm_runs(x, w)  # 6 bf16 = 12 bytes per row: the loop runs instead
    out = grouped_linear(x, w, torch.tensor([1, 3]))
    assert out.shape == (4, 8)


def test_grouped_experts_compute_weighted_swiglu_per_expert(megatron_single_rank: None) -> None:
    experts = GroupedExperts(3, _tc())
    counts = torch.tensor([2, 0, 3])
    x, probs = torch.randn(5, 32), torch.rand(5)
    out, bias = experts(x, counts, probs)
    assert bias is None
    rows, start = [], 0
    for e, n in enumerate(counts.tolist()):
        h = x[start : start + n] @ experts.fc1_weight[e].T
        gate, up = h.chunk(2, -1)
        rows.append((F.silu(gate) * up * probs[start : start + n, None]) @ experts.fc2_weight[e].T)
        start += n
    torch.testing.assert_close(out, torch.cat(rows))

"""L (multi-latent attention): megatron-core's MLASelfAttention in our stack against the MLA math
written out in plain torch at the same weights (forward and every gradient), with and without
document boundaries; its accounting against the built tensors; its checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import latent_layer, tiny

from nam_layout import Layout
from nam_spec.config import ModelConfig, ParallelConfig
from nam_spec.documents import document_boundaries, segment_ids
from nam_spec.letters import LETTERS


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on [s, b, heads, d] as DeepSeek's MLA applies it: pairs (x_2i, x_2i+1) rotated by
    position * base^(-2i/d), written out rotated halves first (megatron's MLA layout)."""
    s, d = x.shape[0], x.shape[-1]
    angle = torch.arange(s, dtype=torch.float64)[:, None] * base ** (
        -torch.arange(0, d, 2, dtype=torch.float64) / d
    )
    cos, sin = (f(angle)[:, None, None, :].to(x.dtype) for f in (torch.cos, torch.sin))
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


def reference_layer(
    layer: torch.nn.Module, x: torch.Tensor, config: ModelConfig, seg: torch.Tensor | None
) -> torch.Tensor:
    """x + MLA(norm(x)) for [s, b, h], causal, confined to segments ``seg`` [b, s] when given."""
    a, eps = config.attention, config.norm_eps
    n, dn, dr, dv = a.num_heads, a.qk_head_dim, a.qk_pos_emb_head_dim, a.v_head_dim
    att = layer.self_attention
    s, b, _ = x.shape
    h = _rms(x, layer.input_layernorm.weight, eps)
    q = _rms(h @ att.linear_q_down_proj.weight.T, att.q_layernorm.weight, eps) @ att.linear_q_up_proj.weight.T
    q_nope, q_rope = q.view(s, b, n, dn + dr).split([dn, dr], dim=-1)
    latent, k_rope = (h @ att.linear_kv_down_proj.weight.T).split([a.kv_lora_rank, dr], dim=-1)
    kv = _rms(latent, att.kv_layernorm.weight, eps) @ att.linear_kv_up_proj.weight.T
    k_nope, v = kv.view(s, b, n, dn + dv).split([dn, dv], dim=-1)
    q = torch.cat([q_nope, _rope(q_rope, a.rope_base)], dim=-1)
    k = torch.cat([k_nope, _rope(k_rope[:, :, None, :], a.rope_base).expand(s, b, n, dr)], dim=-1)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / (dn + dr) ** 0.5
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None]
    if seg is not None:
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v).reshape(s, b, n * dv)
    return x + out @ att.linear_proj.weight.T


@pytest.mark.parametrize("documents", [False, True])
def test_layer_matches_the_mla_math_forward_and_gradients(
    documents: bool, megatron_single_rank: None
) -> None:
    config = tiny()
    layer = latent_layer(config)
    s, b = 8, 2
    x = torch.randn(s, b, config.hidden_size, requires_grad=True)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 3, 3, -1]])
    params = document_boundaries(docs) if documents else None
    seg = segment_ids(params, b, s, torch.device("cpu")) if documents else None
    # the stack's RoPE for A layers arrives too and must be ignored
    out, _ = layer(x, attention_mask=None, rotary_pos_emb=torch.zeros(s, 1, 1, 8), packed_seq_params=params)
    ref = reference_layer(layer, x, config, seg)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weights = [x, *layer.parameters()]
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, weights, grad_out)
    want = torch.autograd.grad(ref, weights, grad_out)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    assert len(names) == 9
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_formula_counts_the_built_tensors_and_tp_splits_what_it_declares(megatron_single_rank: None) -> None:
    config = tiny()
    layer = latent_layer(config)
    counted = LETTERS["L"].params(config)
    assert counted.total == sum(p.numel() for p in layer.parameters())
    split = sum(p.numel() for p in layer.parameters() if getattr(p, "tensor_model_parallel", False))
    assert counted.tensor_split == split


def test_checks_name_each_dimension_tp_cannot_split() -> None:
    import dataclasses

    config = tiny()
    bad = config.replace(
        attention=dataclasses.replace(
            config.attention, num_heads=6, q_lora_rank=18, kv_lora_rank=9, qk_pos_emb_head_dim=5
        )
    )
    found = LETTERS["L"].problems(bad, ParallelConfig(tensor=4))
    assert found == [
        "model.attention.num_heads 6 is not divisible by parallel.tensor 4 (L layers split the heads across tensor ranks)",
        "model.attention.q_lora_rank 18 is not divisible by parallel.tensor 4 (the query down projection is column-parallel)",
        "model.attention.kv_lora_rank + qk_pos_emb_head_dim = 9 + 5 is not divisible by parallel.tensor 4 "
        "(the key/value down projection is column-parallel)",
        "model.attention.qk_pos_emb_head_dim 5 must be even (RoPE pairs)",
    ]
    assert LETTERS["L"].problems(config, ParallelConfig()) == []


def test_sdpa_core_takes_a_value_head_dim_other_than_the_query_s() -> None:
    from megatron.core.transformer.enums import AttnMaskType

    from nam_spec.local import SDPAttention
    from nam_spec.transformer_config import transformer_config

    core = SDPAttention(
        transformer_config(tiny(), Layout.tile("L", 1)), 1, AttnMaskType.causal, "self", softmax_scale=0.5
    )
    q, k, v = torch.randn(5, 2, 4, 12), torch.randn(5, 2, 4, 12), torch.randn(5, 2, 4, 6)
    out = core(q, k, v, None)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) * 0.5
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bnst,tbnd->sbnd", F.softmax(scores, -1), v).reshape(5, 2, 24)
    torch.testing.assert_close(out, ref)

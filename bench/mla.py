"""Multi-latent attention (L) against GQA attention (A) at the same model FLOPs, NAM56R width.

    NAM_COMMIT=<sha> bash bench/gpu.sh mla

Whole layers as the stack builds them (pre-norm, attention, residual; local backend), bf16,
hidden 3584, sequence 4096, micro-batch 1 and 2, forward+backward. A is NAM56R's (56 query / 8 KV
heads of 64). L has 56 heads, kv rank 512, qk 64 + rope 32, v 64, and the query rank that brings
its model FLOPs per token (DESIGN.md's formula: 6 x matmul weights + causal attention, from the
letters' own accounting) closest to A's; each row reports both FLOPs. Also timed: L at the seed
system's dimensions (32 heads of hidden 4096 is not this width, so 56 heads with ranks 64, qk 64 +
rope 64, v 64), which is cheaper than A.

Check first: L with document boundaries of one whole-row document per row (the variable-length
flash kernel, whose value is padded to the query head dim) against L without boundaries (SDPA),
output and input gradient, bf16.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from bench.report import Report
from bench.world import one_rank_world

SEQ = 4096
MICRO_BATCHES = (1, 2)
KV_RANK, QK, ROPE, V = 512, 64, 32, 64
TOL = 2e-2


def _config(**attention: int) -> Any:
    from nam_spec.presets import preset

    config = preset("nam56r", params_dtype="bfloat16", recompute="none", seq_length=SEQ)
    return config.replace(attention=dataclasses.replace(config.attention, **attention))


def _flops(letter: str, config: Any) -> float:
    from nam_spec.letters import LETTERS

    block = LETTERS[letter]
    return 6.0 * block.params(config).matmul_active + block.extra_flops_per_token(config)


def _same_flops_mla() -> Any:
    """L's geometry with the query rank (a multiple of 64) whose FLOPs per token are closest to A's."""
    target = _flops("A", _config())
    candidates = (
        _config(q_lora_rank=r, kv_lora_rank=KV_RANK, qk_head_dim=QK, qk_pos_emb_head_dim=ROPE, v_head_dim=V)
        for r in range(64, 4096, 64)
    )
    return min(candidates, key=lambda c: abs(_flops("L", c) - target))


def _layer(letter: str, config: Any) -> Any:
    import torch
    from megatron.core.transformer.spec_utils import build_module

    from nam_layout import Layout
    from nam_spec.backends import local_backend
    from nam_spec.letters import LETTERS
    from nam_spec.transformer_config import transformer_config

    tc = transformer_config(config, Layout.tile(letter, 1), letter=letter)
    layer = build_module(LETTERS[letter].spec(local_backend(), config), config=tc, layer_number=1)
    return layer.to(device="cuda", dtype=torch.bfloat16)


def _rope(config: Any, s: int) -> Any:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=config.head_dim, rotary_percent=1.0, rotary_base=10000)
    return rope(s)


def _forward_backward(layer: Any, x: Any, grad: Any, rope: Any, params: Any = None) -> tuple[Any, Any]:
    import torch

    out, _ = layer(x, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=params)
    return out, torch.autograd.grad(out, x, grad)[0]


def _rel(a: Any, ref: Any) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _check(report: Report, layer: Any, config: Any) -> None:
    import torch

    from nam_spec.documents import document_boundaries

    s, b = 1024, 2
    x = torch.randn(s, b, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    ids = torch.arange(b)[:, None].expand(b, s).contiguous()  # one document per row
    varlen = _forward_backward(layer, x, grad, None, document_boundaries(ids, "cuda"))
    sdpa = _forward_backward(layer, x, grad, None)
    for name, a, r in zip(("output", "input grad"), varlen, sdpa, strict=True):
        report.check(f"L {b}x{s}: varlen flash (value padded) {name} vs SDPA, bf16", _rel(a, r), TOL)


def main(report: Report) -> None:
    with one_rank_world():
        _bench(report)


def _bench(report: Report) -> None:
    import torch

    gqa, mla = _config(), _same_flops_mla()
    seed = _config(q_lora_rank=64, kv_lora_rank=64, qk_head_dim=64, qk_pos_emb_head_dim=64, v_head_dim=64)
    layers = {"A": _layer("A", gqa), "L same FLOPs": _layer("L", mla), "L seed dims": _layer("L", seed)}
    _check(report, layers["L same FLOPs"], mla)
    rope = _rope(gqa, SEQ).cuda()
    flops = {"A": _flops("A", gqa), "L same FLOPs": _flops("L", mla), "L seed dims": _flops("L", seed)}
    for b in MICRO_BATCHES:
        x = torch.randn(SEQ, b, gqa.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        times = {}
        for name, layer in layers.items():
            times[name] = report.time(
                f"{name} b{b} s{SEQ} fwd+bwd",
                partial(_forward_backward, layer, x, grad, rope),
                flops_per_token=flops[name],
                q_lora_rank=mla.attention.q_lora_rank if name == "L same FLOPs" else None,
            )
        report.row(f"L same FLOPs / A b{b}", ratio=times["L same FLOPs"] / times["A"])
        print(
            f"b{b}: A {times['A']:.3f} ms ({flops['A']:.4g} FLOP/token), L {times['L same FLOPs']:.3f} ms "
            f"({flops['L same FLOPs']:.4g}, q rank {mla.attention.q_lora_rank}), L seed dims "
            f"{times['L seed dims']:.3f} ms ({flops['L seed dims']:.4g})",
            flush=True,
        )

"""nam-embed on the GPU: what the n-gram hash and structure embeddings add to a NAM56R step.

Shapes: hidden 3584, seq 4096, vocab 65536, batch 1, 2, 4, bf16; the full default
configuration (NgramHashConfig(): orders 2 and 3, 8 heads, 16 tables of ~500k rows x 16;
StructureConfig(): the five C++ channels into a 64-wide bottleneck).

Checks first: the hash on the device equals the hash on the CPU; HybridEmbedding at init equals
megatron's LanguageModelEmbedding (zero-initialised projections); the bf16 extras match fp32.

Then forward+backward times of: the extras alone, megatron's LanguageModelEmbedding, our
HybridEmbedding (the difference is the cost of the extras in place), and one attention layer
(RMSNorm, QKV projection, causal flash SDPA with GQA 56/8 heads of 64, output projection,
residual) at the same batch; and, apart, one fused AdamW step over fp32 master copies of the
extras (once per optimizer step, however many micro-batches it accumulates).

The goal, both embeddings together under 3% of a NAM56R step (52 layers), is checked against a
bound that is measured here: a NAM56R step holds 13 attention layers, so it takes at least
13 x t_attention, and added <= 0.03 x 13 x t_attention meets the goal whatever the other 39
layers cost, where added = max(HybridEmbedding - LanguageModelEmbedding, extras alone) per
micro-batch. The row also gives the share of an ideal step: NAM56R's model FLOPs at the measured
matmul rate (700 TFLOP/s), which no real step beats (115 / 230 / 460 ms at batch 1 / 2 / 4),
without and with the AdamW step counted against a single micro-batch.
"""

from __future__ import annotations

from bench.report import Report
from bench.world import one_rank_world

HIDDEN, SEQ, VOCAB = 3584, 4096, 65536
HEADS, KV_HEADS, HEAD_DIM = 56, 8, 64
ATTENTION_LAYERS = 13  # NAM56R: AEMEAEMEAEMR tiled to 52 layers
MATMUL_TFLOPS = 700.0  # bf16 matmul rate the team's floors use (bench/RESULTS.md, ceilings)
BANDWIDTH_TBS = 4.25  # device-copy bandwidth the floors use (bench/RESULTS.md, ceilings)
DEVICE = "cuda"

# NAM56R active parameters per layer kind (matmul weights; experts at top-k / experts), for the
# ideal-step share only. A: QKV 3584 x (56 + 2 x 8) x 64 + out 3584 x 3584. E: 4 of 16 SwiGLU
# experts of 896 and a shared SwiGLU expert of 1024, router 3584 x 16. M: in_proj 3584 x
# (2 x 7168 + 2 x 8 x 64 + 112 heads), out_proj 7168 x 3584. R: taken as a Mamba layer (an
# overestimate, which only makes the ideal step longer by < 2%). Output layer 65536 x 3584.
_ACTIVE = {
    "A": HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HIDDEN * HIDDEN,
    "E": 4 * 3 * HIDDEN * 896 + 3 * HIDDEN * 1024 + HIDDEN * 16,
    "M": HIDDEN * (2 * 7168 + 2 * 8 * 64 + 112) + 7168 * HIDDEN,
}
_ACTIVE["R"] = _ACTIVE["M"]
NAM56R_COUNTS = {"A": 13, "E": 22, "M": 13, "R": 4}


def _ideal_step_ms(batch: int) -> float:
    """DESIGN's model FLOPs of one NAM56R step at the measured matmul rate."""
    active = sum(NAM56R_COUNTS[k] * _ACTIVE[k] for k in NAM56R_COUNTS) + VOCAB * HIDDEN
    tokens = batch * SEQ
    flops = 6 * active * tokens + ATTENTION_LAYERS * 6 * SEQ * HEADS * HEAD_DIM * tokens
    return flops / (MATMUL_TFLOPS * 1e12) * 1e3


def _attention_layer():
    import torch
    from torch import nn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class AttentionLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.RMSNorm(HIDDEN)
            self.qkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)
            self.out = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            q, k, v = self.qkv(self.norm(x)).split(
                [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1
            )
            q = q.view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
            # Flash attention wants equal head counts: repeat the 8 KV heads (about 0.1 ms of copies).
            k = k.view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
            v = v.view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return x + self.out(o.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))

    return AttentionLayer()


def main(report: Report) -> None:
    with one_rank_world():
        _bench(report)


def _bench(report: Report) -> None:
    import torch
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nam_embed import (
        HybridEmbedding,
        NgramHashConfig,
        NgramHashEmbedding,
        StructureConfig,
        StructureEmbedding,
    )

    dev, bf16 = torch.device(DEVICE), torch.bfloat16
    ngram_cfg, structure_cfg = NgramHashConfig(), StructureConfig()
    schema = structure_cfg.schema

    def inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        gen = torch.Generator(device=dev).manual_seed(seed)
        ids = torch.randint(0, VOCAB, (batch, SEQ), device=dev, generator=gen)
        # Packed rows: documents of 1000 tokens, positions restart at each.
        positions = (torch.arange(SEQ, device=dev) % 1000).expand(batch, SEQ)
        structure = {
            c.name: torch.randint(0, c.vocab, (batch, SEQ), device=dev, generator=gen)
            for c in schema.channels
        }
        return ids, positions, structure

    # --- checks -------------------------------------------------------------------------------
    ngram32 = NgramHashEmbedding(ngram_cfg, HIDDEN, device=dev)
    ids, positions, structure = inputs(2, seed=0)
    on_cpu = NgramHashEmbedding(ngram_cfg, HIDDEN, device="cpu")
    mismatched = (ngram32.indices(ids, positions).cpu() != on_cpu.indices(ids.cpu(), positions.cpu())).sum()
    report.check("hash indices: cuda == cpu (mismatches)", float(mismatched), 0.0)
    del on_cpu

    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=KV_HEADS,
        bf16=True,
        params_dtype=bf16,
        hidden_dropout=0.0,
    )
    torch.manual_seed(0)
    upstream = LanguageModelEmbedding(config, VOCAB, SEQ, position_embedding_type="rope")
    torch.manual_seed(0)
    hybrid = HybridEmbedding(
        config, VOCAB, SEQ, position_embedding_type="rope", ngram=ngram_cfg, structure=structure_cfg
    )
    hybrid.word_embeddings.weight.data.copy_(upstream.word_embeddings.weight)
    with torch.no_grad():
        diff = (hybrid(ids, positions, structure=structure) - upstream(ids, positions)).abs().max()
    report.check("HybridEmbedding at init == LanguageModelEmbedding", float(diff), 0.0)

    # bf16 extras against fp32 with moving (non-zero) projections.
    structure32 = StructureEmbedding(structure_cfg, HIDDEN, device=dev)
    with torch.no_grad():
        for p32, p16 in (
            (ngram32.proj.weight, hybrid.ngram.proj.weight),
            (structure32.up.weight, hybrid.structure.up.weight),
        ):
            p32.normal_(0.0, 0.02)
            p16.copy_(p32)
        structure32.weight.copy_(hybrid.structure.weight)
        want = ngram32(ids, positions) + structure32(structure, ids)
        got = hybrid.extras(ids, positions, structure).float()
    report.check("extras bf16 vs fp32 (relative norm error)", float((got - want).norm() / want.norm()), 1e-2)
    del ngram32, structure32

    # --- timings ------------------------------------------------------------------------------
    attention = _attention_layer().to(dev, bf16)
    extras = hybrid.extra_parameters()
    n_params = sum(p.numel() for p in extras)

    # Once per optimizer step: Adam over fp32 master copies of the extras (megatron's mixed
    # precision keeps fp32 master weights and moments).
    master = [torch.randn(p.shape, device=dev, requires_grad=True) for p in extras]
    for p in master:
        p.grad = torch.randn_like(p)
    adam = torch.optim.AdamW(master, lr=1e-4, fused=True)
    t_adam = report.time(
        "AdamW step over the extras (fp32, fused)",
        adam.step,
        # read param, grad, two moments; write param and two moments: 28 bytes per parameter
        floor_ms=28 * n_params / (BANDWIDTH_TBS * 1e12) * 1e3,
    )
    del master, adam

    def measure(batch: int) -> None:
        ids, positions, structure = inputs(batch, seed=batch)
        grad = torch.randn(SEQ, batch, HIDDEN, device=dev, dtype=bf16)
        grad_bsh = grad.transpose(0, 1).contiguous()
        x = torch.randn(batch, SEQ, HIDDEN, device=dev, dtype=bf16, requires_grad=True)

        def fwd_bwd(module: torch.nn.Module, call, g: torch.Tensor):
            def run() -> None:
                call().backward(g)
                for p in [*module.parameters(), x]:
                    p.grad = None  # a fresh micro-batch: the dense table gradient is written anew

            return run

        t_extras = report.time(
            f"extras (ngram + structure) b{batch}",
            fwd_bwd(hybrid, lambda: hybrid.extras(ids, positions, structure), grad_bsh),
            # floor: write and read the dense n-gram weight gradient once (bf16) at copy bandwidth
            floor_ms=2 * ngram_cfg.rows * ngram_cfg.dim * 2 / (BANDWIDTH_TBS * 1e12) * 1e3,
        )
        t_up = report.time(
            f"megatron LanguageModelEmbedding b{batch}",
            fwd_bwd(upstream, lambda: upstream(ids, positions), grad),
        )
        t_hy = report.time(
            f"HybridEmbedding b{batch}",
            fwd_bwd(hybrid, lambda: hybrid(ids, positions, structure=structure), grad),
        )
        flops = 3 * 2 * batch * SEQ * (_ACTIVE["A"]) + 3.5 * 2 * batch * HEADS * SEQ * SEQ * HEAD_DIM
        t_attn = report.time(
            f"attention layer b{batch}",
            fwd_bwd(attention, lambda: attention(x), grad_bsh),
            floor_ms=flops / (MATMUL_TFLOPS * 1e12) * 1e3,
        )
        added = max(t_hy - t_up, t_extras)
        bound = ATTENTION_LAYERS * t_attn
        ideal = _ideal_step_ms(batch)
        report.row(
            f"share of a NAM56R step b{batch}",
            ms=added,
            of_13_attention_pct=100 * added / bound,
            of_ideal_step_pct=100 * added / ideal,
            with_adam_of_ideal_step_pct=100 * (added + t_adam) / ideal,
            ideal_step_ms=ideal,
        )
        report.check(f"extras / (13 x attention layer) b{batch} (goal < 3%)", added / bound, 0.03)

    for batch in (1, 2, 4):
        measure(batch)
    report.row("extra parameters", params_millions=n_params / 1e6, bf16_gib=n_params * 2 / 2**30)

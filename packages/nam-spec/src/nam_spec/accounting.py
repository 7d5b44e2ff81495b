"""Parameter counts per letter from the geometry alone (no tensors), and model FLOPs (DESIGN.md).

Counts are of the whole model (all tensor-parallel shards together). ``active`` counts the routed
experts at top_k / num_experts, as a token sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

from nam_layout import Layout
from nam_spec.config import ModelConfig


@dataclass(frozen=True)
class LetterParams:
    total: int
    active: int
    matmul_active: int  # active weights of matrix multiplies (what the FLOP formula counts)


def letter_params(config: ModelConfig, letter: str) -> LetterParams:
    h = config.hidden_size
    norm = h
    if letter == "A":
        a = config.attention
        d = config.head_dim
        mm = h * (a.num_heads * d + 2 * a.num_kv_heads * d) + a.num_heads * d * h
        return LetterParams(mm + norm, mm + norm, mm)
    if letter == "E":
        m = config.moe
        experts = m.num_experts * 3 * m.ffn_hidden_size * h  # fc1 [2F, h] + fc2 [h, F] per expert
        shared = 3 * m.shared_ffn_hidden_size * h
        router = m.num_experts * h
        active_experts = experts * m.top_k // m.num_experts
        mm = active_experts + shared + router
        return LetterParams(experts + shared + router + norm, mm + norm, mm)
    if letter == "-":
        mm = 3 * config.ffn_hidden_size * h
        return LetterParams(mm + norm, mm + norm, mm)
    if letter == "M":
        s = config.mamba
        di = s.expand * h
        nh, gn = di // s.head_dim, s.ngroups * s.d_state
        mm = h * (2 * di + 2 * gn + nh) + di * h
        conv = (di + 2 * gn) * (s.conv_width + 1)
        core = conv + 3 * nh + di  # conv weight+bias, dt_bias, A_log, D, gated-norm weight
        return LetterParams(mm + core + norm, mm + core + norm, mm)
    if letter == "R":
        r = config.m2rnn
        qk, hv = 2 * r.num_qk_heads * r.head_dim_k, r.num_heads * r.head_dim_v
        mm = qk * h + h * r.num_heads * (2 * r.head_dim_v + 1) + hv * h
        core = (qk + hv) * (r.conv_width + 1) + 3 * r.num_heads + r.num_heads * r.head_dim_v**2 + hv
        return LetterParams(mm + core + norm, mm + core + norm, mm)
    raise KeyError(f"no parameter formula for letter {letter!r}; letters: A E M R -")


@dataclass(frozen=True)
class ModelParams:
    per_letter: dict[str, LetterParams]  # one layer of each letter present
    counts: dict[str, int]
    embedding: int
    output: int
    final_norm: int

    @property
    def layers_total(self) -> int:
        return sum(self.per_letter[k].total * n for k, n in self.counts.items())

    @property
    def total(self) -> int:
        return self.layers_total + self.embedding + self.output + self.final_norm

    @property
    def active(self) -> int:
        layers = sum(self.per_letter[k].active * n for k, n in self.counts.items())
        return layers + self.embedding + self.output + self.final_norm

    @property
    def matmul_active(self) -> int:
        """Every active matmul weight including the output layer, not the embedding lookup."""
        layers = sum(self.per_letter[k].matmul_active * n for k, n in self.counts.items())
        return layers + (self.output or self.embedding)  # a tied output layer is still a matmul


def model_params(config: ModelConfig, layout: Layout) -> ModelParams:
    counts = {k: n for k, n in layout.counts.items() if n}
    emb = config.vocab_size * config.hidden_size
    return ModelParams(
        {k: letter_params(config, k) for k in counts},
        counts,
        embedding=emb,
        output=emb if config.untie_output else 0,
        final_norm=config.hidden_size,
    )


def model_flops_per_token(config: ModelConfig, layout: Layout) -> float:
    """Forward+backward model FLOPs per token: 6 x active matmul weights + causal attention
    6 x seq x (heads x head_dim) per A layer. Scans are not counted (DESIGN.md)."""
    p = model_params(config, layout)
    attn = 6 * config.seq_length * config.attention.num_heads * config.head_dim * layout.counts["A"]
    return 6.0 * p.matmul_active + attn

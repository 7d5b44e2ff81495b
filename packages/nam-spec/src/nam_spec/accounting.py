"""Parameter counts from the geometry alone (no tensors), and model FLOPs (DESIGN.md).

Counts are of the whole model (all tensor-parallel shards together). ``active`` counts the routed
experts at top_k / num_experts, as a token sees them. Each letter's formula lives in its module
(:mod:`nam_spec.letters`); this module adds the embedding, its extras and the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from nam_layout import Layout
from nam_spec.config import ModelConfig
from nam_spec.letters import LetterParams, letter


def letter_params(config: ModelConfig, key: str) -> LetterParams:
    return letter(key).params(config)


def embedding_extra_params(config: ModelConfig) -> int:
    """The n-gram hash tables with their projection, and the structure channels' table, per-channel
    scales and up-projection (nam-embed's modules, counted from their configs)."""
    h, total = config.hidden_size, 0
    if (ngram := config.embedding.ngram_config()) is not None:
        total += ngram.rows * ngram.dim + ngram.num_tables * ngram.dim * h
    if (structure := config.embedding.structure_config()) is not None:
        vocab = sum(structure.schema[name].vocab for name in structure.channels)
        total += vocab * structure.bottleneck + len(structure.channels) + structure.bottleneck * h
    return total


@dataclass(frozen=True)
class ModelParams:
    per_letter: dict[str, LetterParams]  # one layer of each letter present
    counts: dict[str, int]
    embedding: int  # the word embedding
    embedding_extras: int  # n-gram and structure embeddings (not matmul weights of the formula)
    output: int
    final_norm: int

    @property
    def layers_total(self) -> int:
        return sum(self.per_letter[k].total * n for k, n in self.counts.items())

    @property
    def outside_layers(self) -> int:
        return self.embedding + self.embedding_extras + self.output + self.final_norm

    @property
    def total(self) -> int:
        return self.layers_total + self.outside_layers

    @property
    def active(self) -> int:
        layers = sum(self.per_letter[k].active * n for k, n in self.counts.items())
        return layers + self.outside_layers

    @property
    def matmul_active(self) -> int:
        """Every active matmul weight including the output layer, not the embedding lookups."""
        layers = sum(self.per_letter[k].matmul_active * n for k, n in self.counts.items())
        return layers + (self.output or self.embedding)  # a tied output layer is still a matmul


def model_params(config: ModelConfig, layout: Layout) -> ModelParams:
    counts = {k: n for k, n in layout.counts.items() if n}
    emb = config.vocab_size * config.hidden_size
    return ModelParams(
        {k: letter_params(config, k) for k in counts},
        counts,
        embedding=emb,
        embedding_extras=embedding_extra_params(config),
        output=emb if config.untie_output else 0,
        final_norm=config.hidden_size,
    )


def model_flops_per_token(config: ModelConfig, layout: Layout) -> float:
    """Forward+backward model FLOPs per token: 6 x active matmul weights plus what each letter adds
    beyond its weights (causal attention: 6 x seq x heads x head_dim per A layer). Scans are not
    counted (DESIGN.md)."""
    p = model_params(config, layout)
    extra = sum(letter(k).extra_flops_per_token(config) * n for k, n in p.counts.items())
    return 6.0 * p.matmul_active + extra

"""Parameter counts from the geometry alone (no tensors), and model FLOPs (DESIGN.md).

Counts are of the whole model (all tensor-parallel shards together), except :func:`rank_params`:
what one rank holds at a parallel layout. ``active`` counts the routed experts at top_k /
num_experts, as a token sees them. Each letter's formula lives in its module
(:mod:`nam_spec.letters`); this module adds the embedding, its extras and the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from nam_layout import Layout, StagePlan
from nam_spec.config import ModelConfig, ParallelConfig
from nam_spec.letters import MTP_LETTERS, LetterParams, letter


def letter_params(config: ModelConfig, key: str) -> LetterParams:
    return letter(key).params(config)


def ngram_table_params(config: ModelConfig) -> int:
    """The n-gram hash tables alone: the one part of the extras split (by rows) over TP ranks."""
    ngram = config.embedding.ngram_config()
    return 0 if ngram is None else ngram.rows * ngram.dim


def embedding_extra_params(config: ModelConfig) -> int:
    """The n-gram hash tables with their projection, and the structure channels' table, per-channel
    scales and up-projection (nam-embed's modules, counted from their configs)."""
    h, total = config.hidden_size, ngram_table_params(config)
    if (ngram := config.embedding.ngram_config()) is not None:
        total += ngram.num_tables * ngram.dim * h
    if (structure := config.embedding.structure_config()) is not None:
        vocab = sum(structure.schema[name].vocab for name in structure.channels)
        total += vocab * structure.bottleneck + len(structure.channels) + structure.bottleneck * h
    return total


def mtp_depth_params(config: ModelConfig) -> LetterParams:
    """One multi-token-prediction depth (nam_spec.mtp): its two norms, eh_proj (2h -> h, column-
    parallel), the layers of MTP_LETTERS and their final norm; the embedding and output layer it
    shares are not counted here (their matmul is, in ``ModelParams.matmul_active``)."""
    h = config.hidden_size
    layers = [letter_params(config, key) for key in MTP_LETTERS]
    proj = 2 * h * h
    total = 3 * h + proj + sum(p.total for p in layers)
    active = 3 * h + proj + sum(p.active for p in layers)
    matmul = proj + sum(p.matmul_active for p in layers)
    return LetterParams(total, active, matmul, proj + sum(p.tensor_split for p in layers), 0)


@dataclass(frozen=True)
class ModelParams:
    per_letter: dict[str, LetterParams]  # one layer of each letter present
    counts: dict[str, int]
    embedding: int  # the word embedding
    embedding_extras: int  # n-gram and structure embeddings (not matmul weights of the formula)
    output: int
    final_norm: int
    mtp_depth: int  # multi-token-prediction depths, each of ``mtp`` parameters
    mtp: LetterParams

    @property
    def layers_total(self) -> int:
        layers = sum(self.per_letter[k].total * n for k, n in self.counts.items())
        return layers + self.mtp_depth * self.mtp.total

    @property
    def outside_layers(self) -> int:
        return self.embedding + self.embedding_extras + self.output + self.final_norm

    @property
    def total(self) -> int:
        return self.layers_total + self.outside_layers

    @property
    def active(self) -> int:
        layers = sum(self.per_letter[k].active * n for k, n in self.counts.items())
        return layers + self.mtp_depth * self.mtp.active + self.outside_layers

    @property
    def matmul_active(self) -> int:
        """Every active matmul weight including the output layer (once more per MTP depth, which
        runs it again), not the embedding lookups."""
        layers = sum(self.per_letter[k].matmul_active * n for k, n in self.counts.items())
        output = self.output or self.embedding  # a tied output layer is still a matmul
        return layers + output + self.mtp_depth * (self.mtp.matmul_active + output)


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
        mtp_depth=config.mtp_depth,
        mtp=mtp_depth_params(config),
    )


@dataclass(frozen=True)
class RankParams:
    """The parameters one rank holds: ``dense`` (their optimizer state is split over the
    data-parallel group) and the routed ``expert`` ones (over the expert-data-parallel group)."""

    dense: int
    expert: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def rank_params(
    config: ModelConfig, plan: StagePlan, parallel: ParallelConfig, pipeline_rank: int
) -> RankParams:
    """What megatron puts on one rank of pipeline rank ``pipeline_rank`` (every one of its tensor,
    expert and data-parallel ranks holds as much): the layers of its chunks in ``plan``, sharded as
    each letter declares; the vocabulary-parallel word embedding and the extras (n-gram tables
    split by rows, the rest replicated) with the first chunk; the final norm and the vocabulary-
    parallel output layer with the last, which holds its own copy of a tied embedding unless it is
    the first chunk too; with multi-token prediction the last also holds the depths and, unless it
    is the first, a copy of the embedding with its extras."""
    tp, last = parallel.tensor, len(plan.chunks) - 1
    vocab_shard = config.vocab_size * config.hidden_size // tp
    dense = expert = 0
    for virtual in range(plan.virtual):
        chunk = plan.chunk_index(pipeline_rank, virtual)
        for key in plan.chunk_kinds(pipeline_rank, virtual):
            layer_dense, layer_expert = letter_params(config, key).local(parallel)
            dense, expert = dense + layer_dense, expert + layer_expert
        tables = ngram_table_params(config)
        embedding = vocab_shard + embedding_extra_params(config) - tables + tables // tp
        if chunk == 0:
            dense += embedding
        if chunk == last:
            dense += config.hidden_size + (vocab_shard if config.untie_output or last > 0 else 0)
            if config.mtp_depth:
                dense += config.mtp_depth * mtp_depth_params(config).local(parallel)[0]
                if last > 0:  # the embedding's copy, whose word embedding a tied output layer uses
                    dense += embedding - (0 if config.untie_output else vocab_shard)
    return RankParams(dense, expert)


def model_flops_per_token(config: ModelConfig, layout: Layout) -> float:
    """Forward+backward model FLOPs per token: 6 x active matmul weights plus what each letter adds
    beyond its weights (causal attention: 6 x seq x heads x head_dim per A layer). Scans are not
    counted (DESIGN.md)."""
    p = model_params(config, layout)
    counts = dict(p.counts)
    for key in MTP_LETTERS:  # each depth's layers
        counts[key] = counts.get(key, 0) + config.mtp_depth
    extra = sum(letter(k).extra_flops_per_token(config) * n for k, n in counts.items())
    return 6.0 * p.matmul_active + extra

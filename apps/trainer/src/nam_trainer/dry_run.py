"""``nam-train --dry-run``: what a run would build, from configuration alone, without a model.

The layout and stage plan come from nam-layout; the data section says which documents would be
read and what the cache already holds. Model parameters and memory come from nam-spec's
describe() once the model builder is wired in.
"""

from __future__ import annotations

from collections.abc import Callable

from nam_trainer.config import Checked, to_toml
from nam_trainer.data import cache_status, plan_corpus


def report(checked: Checked, sources: str, out: Callable[[str], None] = print) -> None:
    """Print the layout, parallel plan, model widths and data plan; data errors propagate."""
    cfg, layout, sizes, plan = checked.config, checked.layout, checked.sizes, checked.stages
    m, moe, mamba, rnn = cfg.model, cfg.moe, cfg.mamba, cfg.m2rnn
    out(f"nam-train dry run: {sources}")
    counts = ", ".join(f"{k} {n}" for k, n in layout.counts.items() if n)
    out(f"layout    {m.family}: {layout.pattern} x {layout.depth} layers: {counts}")
    for letter in layout.letters:
        if layout.counts[letter]:
            where = ", ".join(map(str, layout.positions(letter)))
            out(f"          {letter} {layout.letters[letter]:<18} at {where}")
    out(f"stages    {plan.stages} pipeline x {plan.virtual} virtual: {plan.cut_pattern()}")
    for k, (a, b) in enumerate(plan.chunks):
        out(
            f"          chunk {k}: rank {plan.rank(k)} virtual {plan.virtual_stage(k)} layers {a + 1}-{b} {layout.kinds[a:b]}"
        )
    for warning in plan.warnings:
        out(f"          warning: {warning}")
    out(
        f"parallel  world {sizes.world} = tensor {sizes.tensor} x pipeline {sizes.pipeline} x data {sizes.data}; "
        f"expert {sizes.expert}; sequence parallel {'on' if cfg.parallel.sequence_parallel else 'off'}"
    )
    shared = f", shared {moe.shared_expert_ffn_hidden_size}" if moe.shared_expert_ffn_hidden_size else ""
    out(
        f"model     hidden {m.hidden_size}; attention {m.num_attention_heads} heads / {m.num_query_groups} KV "
        f"(head dim {m.head_dim}); MoE {moe.num_experts} experts top-{moe.router_topk} (FFN {moe.ffn_hidden_size}"
        f"{shared}, {moe.router_score_function}); Mamba state {mamba.state_dim}, head {mamba.head_dim}, "
        f"groups {mamba.num_groups}, expand {mamba.expand}; M2RNN {rnn.num_v_heads} x {rnn.v_head_dim} "
        f"(k {rnn.k_head_dim})"
    )
    t = cfg.training
    out(
        f"training  {t.steps} steps, global batch {t.global_batch_size} = micro {t.micro_batch_size} x data "
        f"{sizes.data} x {t.global_batch_size // (t.micro_batch_size * sizes.data)} microbatches, "
        f"{t.global_batch_size * cfg.data.seq_length:,} tokens per step, precision {t.precision}"
    )
    corpus_plan = plan_corpus(cfg.data)
    corpus = corpus_plan.corpus
    out(
        f"data      {len(corpus.documents)} documents ({len(corpus_plan.train)} train, "
        f"{len(corpus_plan.validation)} validation), {corpus.num_bytes:,} bytes, from {corpus.origin}"
    )
    if corpus.skipped:
        out(f"          skipped: {', '.join(f'{n} {why}' for why, n in corpus.skipped.items())}")
    out(f"          rows of {cfg.data.seq_length} tokens, structure channels: {cfg.data.structure}")
    for line in cache_status(cfg.data, cfg.tokenizer, corpus_plan):
        out(f"          {line}")
    out("\n# the resolved configuration (nam-train --config FILE reproduces it)")
    out(to_toml(cfg))

"""``nam-train --dry-run``: what a run would build, from configuration alone, without a model.

The layout and stage plan come from nam-layout; the data section says which documents would be
read and what the cache already holds. The model facts come from nam-spec on the config that
``model_config.model_setup`` maps (the one the run builds): describe()'s layer table from the
specs, parameters and FLOPs from its accounting, one GPU's memory from its estimate. Nothing is
allocated: the embedding extras are counted on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable

from nam_trainer.config import Checked, ConfigError, to_toml
from nam_trainer.data import cache_status, plan_corpus
from nam_trainer.model_config import ModelSetup, model_setup, resolved_precision


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
    model_report(checked, out)
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


def model_report(checked: Checked, out: Callable[[str], None] = print) -> None:
    """Layer table, parameters (total and active per token), model FLOPs per token and one GPU's
    memory at this config's micro-batch, data-parallel size and precision."""
    import torch

    from nam_spec import SpecConfigError, describe, memory_estimate, model_flops_per_token, model_params

    cfg, sizes = checked.config, checked.sizes
    precision = resolved_precision(cfg.training.precision, torch.cuda.is_available())
    setup = model_setup(cfg, precision=precision)
    config, layout = setup.config, setup.layout
    try:
        table = describe(layout, config).table()
    except SpecConfigError as err:
        raise ConfigError(f"the model cannot be built: {err}") from err
    params, extras = model_params(config, layout), embedding_extras(setup)
    out(f"spec      nam-spec layer table ({config.backend} backend classes, parameters from the formula):")
    for line in table.splitlines():
        out(f"          {line}")
    out(
        f"params    total {params.total + extras:,} = formula {params.total:,} + embedding extras {extras:,}; "
        f"active per token {params.active + extras:,} (routed experts at top-{config.moe.top_k} of "
        f"{config.moe.num_experts})"
    )
    flops = model_flops_per_token(config, layout)
    step = flops * cfg.data.seq_length * cfg.training.global_batch_size
    out(
        f"flops     {flops:.4g} model FLOPs per token forward+backward, {step:.4g} per step (6 x active "
        f"matmul weights + causal attention; scans not counted)"
    )
    try:
        memory = memory_estimate(
            config,
            layout,
            micro_batch_size=cfg.training.micro_batch_size,
            data_parallel=sizes.data,
            distributed_optimizer=cfg.parallel.distributed_optimizer,
            extra_params=extras,
        )
    except SpecConfigError as err:
        out(f"memory    not estimated: {err}")
        return
    out(
        f"memory    {memory.total_gib:.1f} GiB peak per GPU (micro-batch {cfg.training.micro_batch_size} x "
        f"seq {cfg.data.seq_length}, {precision}, data parallel {sizes.data}, distributed optimizer "
        f"{'on' if cfg.parallel.distributed_optimizer else 'off'}, recompute {cfg.training.recompute}; nam_spec.memory)"
    )
    for line in memory.table().splitlines():
        out(f"          {line}")


def embedding_extras(setup: ModelSetup) -> int:
    """Parameters of the n-gram and structure embeddings, built on the meta device."""
    import torch

    from nam_embed import NgramHashEmbedding, StructureEmbedding

    hidden = setup.config.hidden_size
    modules = {"ngram": NgramHashEmbedding, "structure": StructureEmbedding}
    with torch.device("meta"):
        built = [modules[name](extra, hidden) for name, extra in setup.embedding.items()]
    return sum(p.numel() for m in built for p in m.parameters())

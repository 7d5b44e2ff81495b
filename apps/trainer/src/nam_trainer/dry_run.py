"""``nam-train --dry-run``: what a run would build, from configuration alone, without a model.

The layout and stage plan come from nam-layout; the data section says which documents would be
read and what the cache already holds. The model facts come from nam-spec on ``[model]``, which is
nam-spec's own config (the one the run builds): describe()'s layer table from the specs, exactly
as ``nam-spec plan`` prints it, parameters and FLOPs from its accounting, every pipeline rank's
memory from its estimate, with the most loaded rank's breakdown and, given a GPU size, whether it
fits. Nothing is allocated.
"""

from __future__ import annotations

from collections.abc import Callable

from nam_spec import MemoryPlan, SpecConfigError, memory_plan
from nam_spec.letters import LETTERS
from nam_trainer.config import Checked, ConfigError, to_toml
from nam_trainer.data import cache_status, plan_corpus


def report(
    checked: Checked, sources: str, gpu_memory_gib: float | None = None, out: Callable[[str], None] = print
) -> bool:
    """Print the layout, parallel plan, model widths and data plan; data errors propagate. False
    when the most loaded rank's memory estimate exceeds ``gpu_memory_gib``."""
    memory = estimate_memory(checked)  # before anything is printed: it may refuse the combination
    cfg, layout, sizes, plan = checked.config, checked.layout, checked.sizes, checked.stages
    m = cfg.model
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
    letters = "; ".join(LETTERS[k].summary(m) for k in LETTERS if layout.counts[k])
    if m.mtp_depth:
        letters += f"; multi-token prediction: {m.mtp_depth} depths, loss weight {m.mtp_loss_weight}"
    out(
        f"model     preset geometry: hidden {m.hidden_size}, vocab {m.vocab_size}, seq {m.seq_length}; "
        f"{letters}; {m.backend} backend"
    )
    t = cfg.training
    out(
        f"training  {t.steps} steps, global batch {t.global_batch_size} = micro {t.micro_batch_size} x data "
        f"{sizes.data} x {checked.microbatches} microbatches, "
        f"{t.global_batch_size * m.seq_length:,} tokens per step, {m.dtype_name} parameters"
    )
    fits = model_report(checked, memory, gpu_memory_gib, out)
    corpus_plan = plan_corpus(cfg.data)
    corpus = corpus_plan.corpus
    out(
        f"data      {len(corpus.documents)} documents ({len(corpus_plan.train)} train, "
        f"{len(corpus_plan.validation)} validation), {corpus.num_bytes:,} bytes, from {corpus.origin}"
    )
    if corpus.skipped:
        out(f"          skipped: {', '.join(f'{n} {why}' for why, n in corpus.skipped.items())}")
    out(f"          rows of {m.seq_length} tokens, structure channels: {cfg.data.structure}")
    for line in cache_status(cfg, corpus_plan):
        out(f"          {line}")
    out("\n# the resolved configuration (nam-train --config FILE reproduces it)")
    out(to_toml(cfg))
    return fits


def estimate_memory(checked: Checked) -> MemoryPlan:
    """nam-spec's memory estimate of every pipeline rank at this config's parallel layout, stage
    plan, micro-batches and precision; a combination it refuses is a ConfigError."""
    cfg, t = checked.config, checked.config.training
    try:
        return memory_plan(
            cfg.model,
            checked.layout,
            cfg.parallel,
            micro_batch_size=t.micro_batch_size,
            num_microbatches=checked.microbatches,
            data_parallel=checked.sizes.data,
            distributed_optimizer=cfg.parallel.distributed_optimizer,
            plan=checked.stages,
        )
    except SpecConfigError as err:
        raise ConfigError(str(err)) from err


def model_report(
    checked: Checked,
    memory: MemoryPlan,
    gpu_memory_gib: float | None = None,
    out: Callable[[str], None] = print,
) -> bool:
    """Layer table, parameters (total and active per token), model FLOPs per token and ``memory``:
    every pipeline rank's peak, the most loaded rank's in full; False when that rank exceeds
    ``gpu_memory_gib``."""
    from nam_spec import describe, model_flops_per_token, model_params

    cfg, sizes, layout = checked.config, checked.sizes, checked.layout
    config, t = cfg.model, cfg.training
    try:
        table = describe(layout, config).table()
    except SpecConfigError as err:
        raise ConfigError(f"the model cannot be built: {err}") from err
    params = model_params(config, layout)
    out(f"spec      nam-spec layer table ({config.backend} backend classes, parameters from the formula):")
    if config.backend == "te":
        from nam_spec.backends import TE_UNTESTED

        out(f"          warning: {TE_UNTESTED}")
    for line in table.splitlines():
        out(f"          {line}")
    out(
        f"params    total {params.total:,} = {params.total - params.embedding_extras:,} + embedding extras "
        f"{params.embedding_extras:,}; active per token {params.active:,} (routed experts at "
        f"top-{config.moe.top_k} of {config.moe.num_experts})"
    )
    flops = model_flops_per_token(config, layout)
    step = flops * config.seq_length * t.global_batch_size
    out(
        f"flops     {flops:.4g} model FLOPs per token forward+backward, {step:.4g} per step (6 x active "
        f"matmul weights + causal attention; scans not counted)"
    )
    peak = memory.peak
    where = memory.where(peak.pipeline_rank)
    out(
        f"memory    {peak.total_gib:.1f} GiB peak per GPU (micro-batch {t.micro_batch_size} x seq "
        f"{config.seq_length}, {config.dtype_name}, data parallel {sizes.data}, distributed optimizer "
        f"{'on' if cfg.parallel.distributed_optimizer else 'off'}, recompute {config.recompute}, "
        f"{checked.microbatches} micro-batches a step; nam_spec.memory) on the most loaded rank: {where}"
    )
    if len(memory.stages) > 1:
        for line in memory.table().splitlines():
            out(f"          {line}")
        out(f"          {where}:")
    for line in peak.table().splitlines():
        out(f"          {line}")
    if gpu_memory_gib is None:
        return True
    fits = peak.total_gib <= gpu_memory_gib
    if fits:
        out(
            f"          fits a {gpu_memory_gib:g} GiB GPU ({gpu_memory_gib - peak.total_gib:.1f} GiB to spare)"
        )
    else:
        out(
            f"          does not fit a {gpu_memory_gib:g} GiB GPU: {where} needs {peak.total_gib:.1f} GiB "
            f"(more tensor, pipeline or expert parallelism, recompute or a smaller micro-batch lower it)"
        )
    return fits

"""Checks across fields: the family's layout, head and expert counts against the parallel sizes,
batch sizes against data parallelism. All problems are collected and reported together, before
anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass

from nam_layout import (
    BUILTIN,
    FamilyError,
    FamilyRegistry,
    Layout,
    LayoutError,
    PatternError,
    StagePlan,
    plan_stages,
)
from nam_trainer.config.schema import Config, ConfigError


@dataclass(frozen=True)
class ParallelSizes:
    world: int
    tensor: int
    pipeline: int
    virtual_pipeline: int
    expert: int
    data: int


@dataclass(frozen=True)
class Checked:
    """A configuration that passed every check, with what the checks derived."""

    config: Config
    layout: Layout
    sizes: ParallelSizes
    stages: StagePlan


def resolve_layout(config: Config) -> Layout:
    registry = FamilyRegistry(BUILTIN)
    try:
        if config.model.families_file:
            registry.load_toml(config.model.families_file)
        return registry.get(config.model.family).layout()
    except (FamilyError, LayoutError, PatternError, OSError) as err:
        raise ConfigError(f"model.family = {config.model.family!r}: {err}") from err


def check(config: Config, world_size: int) -> Checked:
    """Raise ConfigError listing every problem, or return the layout, parallel sizes and stage plan."""
    layout = resolve_layout(config)
    problems: list[str] = []
    m, moe, p, t = config.model, config.moe, config.parallel, config.training
    kinds = set(layout.kinds)

    inner = p.tensor * p.pipeline
    if p.data == -1:
        if world_size % inner:
            problems.append(
                f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
                f"{p.tensor} x {p.pipeline} = {inner}"
            )
        data = max(world_size // inner, 1)
    else:
        data = p.data
        if data * inner != world_size:
            problems.append(
                f"parallel.tensor x pipeline x data = {p.tensor} x {p.pipeline} x {data} = {data * inner}, "
                f"but the world size is {world_size} (set parallel.data = -1 to follow the world size)"
            )

    if m.kv_channels == 0 and m.hidden_size % m.num_attention_heads:
        problems.append(
            f"model.hidden_size = {m.hidden_size} is not divisible by model.num_attention_heads = "
            f"{m.num_attention_heads} (or set model.kv_channels)"
        )
    if m.num_attention_heads % m.num_query_groups:
        problems.append(
            f"model.num_attention_heads = {m.num_attention_heads} is not divisible by "
            f"model.num_query_groups = {m.num_query_groups}"
        )

    # Each rank holds whole heads, whole groups and whole experts.
    tp_split = {
        "model.num_attention_heads": m.num_attention_heads,
        "model.num_query_groups": m.num_query_groups,
    }
    if "E" in kinds:
        tp_split["moe.ffn_hidden_size"] = moe.ffn_hidden_size
        if moe.shared_expert_ffn_hidden_size:
            tp_split["moe.shared_expert_ffn_hidden_size"] = moe.shared_expert_ffn_hidden_size
    if "-" in kinds:
        tp_split["model.ffn_hidden_size"] = m.ffn_hidden_size
    if "M" in kinds:
        d_inner = config.mamba.expand * m.hidden_size
        if d_inner % config.mamba.head_dim:
            problems.append(
                f"mamba.expand x model.hidden_size = {d_inner} is not divisible by mamba.head_dim = "
                f"{config.mamba.head_dim}"
            )
        tp_split["Mamba heads (mamba.expand x model.hidden_size / mamba.head_dim)"] = (
            d_inner // config.mamba.head_dim
        )
        tp_split["mamba.num_groups"] = config.mamba.num_groups
    if "R" in kinds:
        tp_split["m2rnn.num_v_heads"] = config.m2rnn.num_v_heads
    for what, n in tp_split.items():
        if n % p.tensor:
            problems.append(f"{what} = {n} is not divisible by parallel.tensor = {p.tensor}")

    if "E" in kinds:
        if moe.router_topk > moe.num_experts:
            problems.append(
                f"moe.router_topk = {moe.router_topk} exceeds moe.num_experts = {moe.num_experts}"
            )
        if moe.num_experts % p.expert:
            problems.append(
                f"moe.num_experts = {moe.num_experts} is not divisible by parallel.expert = {p.expert}"
            )
        if data % p.expert:
            problems.append(
                f"parallel.expert = {p.expert} does not divide the data-parallel size {data} "
                "(megatron-core lays expert-parallel groups over data-parallel ranks; expert tensor size = tensor size)"
            )
        if p.tensor > 1 and not p.sequence_parallel:
            problems.append(
                f"parallel.tensor = {p.tensor} with MoE layers needs parallel.sequence_parallel = true "
                "(megatron-core's MoE token dispatch requires it)"
            )
    elif p.expert > 1:
        problems.append(f"parallel.expert = {p.expert} but family {m.family} has no E layers")

    if p.sequence_parallel and config.data.seq_length % p.tensor:
        problems.append(
            f"data.seq_length = {config.data.seq_length} is not divisible by parallel.tensor = {p.tensor} "
            "(sequence parallelism splits the sequence across tensor ranks)"
        )
    if p.virtual_pipeline > 1 and p.pipeline == 1:
        problems.append(f"parallel.virtual_pipeline = {p.virtual_pipeline} needs parallel.pipeline > 1")
    if t.global_batch_size % (t.micro_batch_size * data):
        problems.append(
            f"training.global_batch_size = {t.global_batch_size} is not divisible by "
            f"training.micro_batch_size x data-parallel size = {t.micro_batch_size} x {data}"
        )
    if config.embedding.structure and config.data.structure == "none":
        problems.append(
            'embedding.structure = true needs structure channels, but data.structure = "none" '
            '(set data.structure = "cpp" or embedding.structure = false)'
        )

    pl = config.plasticity
    if pl.stp:
        if not pl.stp_layers and "R" not in kinds:
            problems.append(
                f"plasticity.stp = true with plasticity.stp_layers = [] picks every R layer, but family "
                f"{m.family} has none: list the layers (1-{layout.depth})"
            )
        outside = [n for n in pl.stp_layers if n > layout.depth]
        if outside:
            problems.append(
                f"plasticity.stp_layers = {pl.stp_layers}: {outside} beyond the depth {layout.depth} of {m.family}"
            )
    if (pl.redo_at or pl.redo_every) and not kinds & {"E", "-"}:
        problems.append(f"plasticity.redo_*: ReDo acts on MLP and expert layers; family {m.family} has none")

    stages = None
    try:
        stages = plan_stages(layout, p.pipeline, p.virtual_pipeline)
    except LayoutError as err:
        problems.append(
            f"parallel.pipeline = {p.pipeline}, parallel.virtual_pipeline = {p.virtual_pipeline}: {err}"
        )

    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    assert stages is not None
    sizes = ParallelSizes(world_size, p.tensor, p.pipeline, p.virtual_pipeline, p.expert, data)
    return Checked(config, layout, sizes, stages)

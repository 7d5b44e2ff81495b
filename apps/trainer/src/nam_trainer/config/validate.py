"""Checks across fields: nam-spec's checks of the model against its layout and parallel sizes
(one entry point, ``nam_spec.problems``), then the trainer's own rules: world size, batch sizes,
data, tokenizer and plasticity. All problems are collected and reported together, before anything
is allocated."""

from __future__ import annotations

from dataclasses import dataclass

import nam_spec
from nam_layout import Layout, LayoutError, StagePlan, plan_stages
from nam_spec import SpecConfigError
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

    @property
    def microbatches(self) -> int:
        """Micro-batches a step runs on each data-parallel rank."""
        t = self.config.training
        return t.global_batch_size // (t.micro_batch_size * self.sizes.data)


def check(config: Config, world_size: int) -> Checked:
    """Raise ConfigError listing every problem (nam-spec's model checks and the trainer's own rules),
    or return the layout, parallel sizes and stage plan."""
    try:
        layout = config.model.layout()
    except SpecConfigError as err:
        raise ConfigError(str(err)) from err
    m, p, t = config.model, config.parallel, config.training
    kinds = set(layout.kinds)
    problems = nam_spec.problems(m, layout, p)
    if world_size < 1:
        problems.append(
            f"world size {world_size}: needs at least 1 process (--world-size N; default $WORLD_SIZE "
            "from torchrun, else 1)"
        )

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
    if "E" in kinds:
        if data % p.expert:
            problems.append(
                f"parallel.expert = {p.expert} does not divide the data-parallel size {data} "
                "(megatron-core lays expert-parallel groups over data-parallel ranks; expert tensor size = tensor size)"
            )
    elif p.expert > 1:
        problems.append(f"parallel.expert = {p.expert} but family {m.family} has no E layers")
    if p.virtual_pipeline > 1 and t.global_batch_size % (t.micro_batch_size * data * p.pipeline):
        problems.append(
            f"parallel.virtual_pipeline = {p.virtual_pipeline}: the interleaved schedule runs micro-batches in "
            f"groups of parallel.pipeline = {p.pipeline}, but a step has training.global_batch_size / "
            f"(micro_batch_size x data-parallel size) = {t.global_batch_size} / ({t.micro_batch_size} x {data}) "
            f"of them; make it a multiple of {p.pipeline}"
        )
    if t.global_batch_size % (t.micro_batch_size * data):
        problems.append(
            f"training.global_batch_size = {t.global_batch_size} is not divisible by "
            f"training.micro_batch_size x data-parallel size = {t.micro_batch_size} x {data}"
        )
    if m.embedding.structure and config.data.structure == "none":
        problems.append(
            'model.embedding.structure = true needs structure channels, but data.structure = "none" '
            '(set data.structure = "cpp" or model.embedding.structure = false)'
        )
    if config.data.document_masking and m.backend != "local":
        problems.append(
            f"data.document_masking = true needs model.backend = 'local': the {m.backend!r} backend's "
            "attention takes document boundaries only in megatron's THD layout, which nam-spec does "
            "not build (set data.document_masking = false or model.backend = 'local')"
        )
    if m.params_dtype == "float16":
        problems.append(
            'model.params_dtype = "float16": nam-train trains in "bfloat16" or "float32" (no loss scaling); '
            '"auto" picks bfloat16 on GPU, float32 on CPU'
        )
    if not config.tokenizer.path and m.vocab_size < 256 + 2:
        problems.append(
            f"model.vocab_size = {m.vocab_size}: the byte-level BPE trained for it needs >= 258 tokens "
            "(256 bytes and the two special tokens)"
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
    if (pl.redo_at or pl.redo_every) and "E" in m.cuda_graphs:
        problems.append(
            f"plasticity.redo_* with model.cuda_graphs = {m.cuda_graphs!r}: ReDo reads the E layers' "
            "activations through forward hooks, which a replayed graph does not call; take E out of cuda_graphs"
        )

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

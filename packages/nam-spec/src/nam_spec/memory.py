"""Per-GPU peak memory of a megatron-core training step, from the geometry alone (no tensors), for
every rank of a parallel layout: tensor parallelism (with or without sequence parallelism),
pipeline stages (1F1B, or interleaved with virtual stages), expert parallelism (and expert-tensor
parallelism), data parallelism with or without the distributed optimizer.

What is counted on one rank, in bytes, as ``torch.cuda.max_memory_allocated`` sees it:

- weights: the rank's parameters in the parameter dtype (megatron DDP's contiguous param buffer),
  sharded as megatron shards them (:func:`nam_spec.accounting.rank_params`): column- and
  row-parallel linears and each letter's per-head parameters split over TP, norms, routers and the
  shared q/k head replicated, the vocabulary-parallel embedding (with the n-gram tables split by
  rows, the other extras replicated) on the first pipeline chunk and the vocabulary-parallel output
  layer with the final norm on the last, routed experts split over EP x expert-TP; the layers of
  each pipeline rank's chunks are nam-layout's stage plan;
- grads: megatron DDP's gradient buffer of those parameters (whole on every rank, the distributed
  optimizer too), fp32 (``grad_reduce_in_fp32``) or the parameter dtype;
- optimizer state: fp32 main parameters (only when parameters are bf16/fp16; fp32 parameters are
  their own main copy) plus Adam's m and v in fp32; the distributed optimizer divides the dense
  parameters' state over the data-parallel group and the experts' over the expert-data-parallel
  group (tensor x data / (expert x expert-tensor) ranks);
- activations per letter: the tensors each layer's autograd graph keeps for backward on the
  local backend's CUDA paths at ``seq_length`` x micro-batch, derived term by term in the letter
  modules from what each module saves, under the letter's recompute policy, on one tensor rank: TP
  splits what holds heads, channels or FFN columns (the whole sequence), sequence parallelism splits
  the [s, b, h] tensors between the parallel linears (norm inputs and outputs); the MoE layer's
  tokens are its sequence shard, routed evenly (balanced routing);
- in flight: how many micro-batches' activations a pipeline rank holds at once, from
  megatron-core's schedules (``pipeline_parallel/schedules.py``): 1F1B warms up with
  ``pp - rank - 1`` forwards, so rank i holds up to ``pp - i``; the interleaved schedule warms up
  with ``2 (pp - rank - 1) + (V - 1) pp`` chunk forwards (micro-batch groups of ``pp``, megatron's
  default ``microbatch_group_size_per_vp_stage``), and :func:`_held_at_peak` replays its order of
  chunk forwards and backwards to find the most activation bytes held at once; without a pipeline,
  one micro-batch;
- output: on the rank of the last chunk, final norm, output layer and megatron's vocab-parallel
  cross entropy at its peak (the logits shard in the activation dtype plus their fp32 copy, which
  becomes the saved softmax); each further in-flight micro-batch of that chunk keeps its norm and
  saved softmax; with ``model.loss_chunk_tokens`` one chunk's logits instead of the whole
  sequence's, and the input and a log-sum-exp per token kept (:func:`output_bytes`);
- multi-token prediction (``activations mtp``, on the same rank): per depth, the layers of
  ``MTP_LETTERS`` under their policies, its two norms and the output's kept tensors again;
- transient: how far re-running one recomputed layer in backward goes beyond the output's peak;
- allowance: a fixed :data:`WORKSPACE_BYTES` for what the formula does not follow (cuBLAS/cuBLASLt
  workspaces, which torch takes from its caching allocator; Triton and flash-attention scratch;
  small temporaries of norms and the router; the n-gram/structure embedding's own activations,
  under 1 KB a token). Allocator fragmentation is not in ``max_memory_allocated`` and not here:
  reserved memory (nvidia-smi) runs higher by it.

Not modelled (beyond the allowance): communication buffers: the pipeline's p2p send and receive
tensors ([s/tp, b, h] per in-flight micro-batch; megatron frees the sent outputs' storage), the
all-gathered inputs of sequence-parallel linears (megatron's global memory buffer, one layer's
worth), the MoE dispatcher's all-to-all / all-gather outputs beyond the experts' permuted input,
NCCL's own buffers; routing imbalance (an expert rank receiving more than its share of tokens);
the distributed optimizer's padding of the gradient buffer (a few KB per bucket and rank);
context parallelism (not supported by nam-spec).

The peak is the larger of two moments: the forward/backward peak (every held micro-batch's
activations, the loss of the last) and ``optimizer.step()``, where torch's foreach Adam
(megatron's choice without Transformer Engine or apex) takes one fp32 temporary the size of the
local shard (``sqrt(v)``). Every tensor, expert and data-parallel rank of one pipeline rank holds
equal shards, so one estimate per pipeline rank stands for all of its ranks; with megatron's rank
order (tensor fastest, pipeline slowest) pipeline rank p is global ranks p x world/pp onwards.

Calibration: bench/trainer.py on one H200, preset ``nam56r-small`` (hidden 2048, local
backend, bf16, distributed optimizer on one rank, seq 4096, n-gram and structure extras of 128.7 M
parameters), ``torch.cuda.max_memory_allocated`` against this estimate:

    no recompute, micro-batch 1        measured 44.6 GiB   estimate 44.8 GiB   +0.4%
    selective recompute, micro-batch 1 measured 43.3 GiB   estimate 43.5 GiB   +0.4%
    selective, micro-batch 2           measured 51.5 GiB   estimate 51.7 GiB   +0.3%
    selective, micro-batch 4           measured 67.9 GiB   estimate 68.1 GiB   +0.3%

(micro-batches 2 and 4: the peak less what earlier runs of that process still held). Tests pin
each within 5%. The parallel layouts are not measured on GPUs: their weights, gradient buffer
and optimizer state are checked against the real sharded tensors of tiny models at TP=2 (sequence
parallel), PP=2 (tied), PP=2 x 2 virtual stages and EP=2 over gloo (tests/test_memory_parallel.py),
their activation terms by how they scale and, for attention, experts and the dense MLP, against what layers built at TP=2
with sequence parallelism keep for backward on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nam_layout import Layout, LayoutError, StagePlan, plan_stages
from nam_spec.accounting import rank_params
from nam_spec.config import ModelConfig, ParallelConfig, Recompute, SpecConfigError
from nam_spec.letters import MTP_LETTERS
from nam_spec.letters import letter as letter_block
from nam_spec.letters.base import activation_bytes, norm_bytes, sequence_shard
from nam_spec.validation import validate

GIB = 2**30
WORKSPACE_BYTES = 256 * 2**20  # the documented allowance (module docstring)


@dataclass(frozen=True)
class MemoryEstimate:
    """One GPU's memory in bytes. ``total`` is the larger of ``backward_peak`` (the sum of every
    row but ``step_scratch``) and ``step_peak`` (weights, grads, optimizer state, step scratch,
    allowance)."""

    weights: int
    grads: int
    optimizer_state: int
    activations: dict[str, int]  # letter -> all layers of that letter, every micro-batch held
    output: int
    transient: int
    allowance: int
    step_scratch: int
    notes: dict[str, str] = field(default_factory=dict)
    pipeline_rank: int = 0
    in_flight: tuple[int, ...] = (1,)  # micro-batches held at the peak, per virtual stage of the rank

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer_state

    @property
    def backward_peak(self) -> int:
        return self.static + sum(self.activations.values()) + self.output + self.transient + self.allowance

    @property
    def step_peak(self) -> int:
        return self.static + self.step_scratch + self.allowance

    @property
    def total(self) -> int:
        return max(self.backward_peak, self.step_peak)

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    @property
    def phase(self) -> str:
        return "forward/backward" if self.backward_peak >= self.step_peak else "optimizer step"

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("grads", self.grads),
            ("optimizer state", self.optimizer_state),
            *((f"activations {k}", v) for k, v in self.activations.items()),
            ("output + loss", self.output),
            ("recompute transient", self.transient),
            ("allowance", self.allowance),
        ]

    def table(self) -> str:
        lines = [f"  {'':<22} {'GiB':>8}"]
        lines += [f"  {name:<22} {b / GIB:>8.2f}" for name, b in self.rows()]
        lines.append(f"  {'forward/backward peak':<22} {self.backward_peak / GIB:>8.2f}")
        lines.append(
            f"  {'optimizer-step peak':<22} {self.step_peak / GIB:>8.2f}   "
            f"(Adam scratch {self.step_scratch / GIB:.2f})"
        )
        lines.append(f"  {'peak':<22} {self.total_gib:>8.2f}   ({self.phase})")
        lines += [f"  {k}: {v}" for k, v in self.notes.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class MemoryPlan:
    """One estimate per pipeline rank: ``stages[p]`` stands for every tensor, expert and
    data-parallel rank of pipeline rank p (they hold equal shards)."""

    stages: tuple[MemoryEstimate, ...]
    world_size: int

    @property
    def peak(self) -> MemoryEstimate:
        """The most loaded rank's estimate (the first pipeline rank of equals)."""
        return max(self.stages, key=lambda e: e.total)

    def global_ranks(self, pipeline_rank: int) -> range:
        """The global ranks of ``pipeline_rank`` in megatron's rank order (tensor fastest, pipeline
        slowest)."""
        per = self.world_size // len(self.stages)
        return range(pipeline_rank * per, (pipeline_rank + 1) * per)

    def where(self, pipeline_rank: int) -> str:
        ranks = self.global_ranks(pipeline_rank)
        span = f"global rank {ranks[0]}" if len(ranks) == 1 else f"global ranks {ranks[0]}-{ranks[-1]}"
        return f"pipeline rank {pipeline_rank} ({span})"

    def table(self) -> str:
        """One line per pipeline rank: its peak, the phase of the peak and the micro-batches in
        flight per virtual stage then."""
        where = [self.where(e.pipeline_rank) for e in self.stages]
        width = max(map(len, where))
        return "\n".join(
            f"  {w:<{width}} {e.total_gib:>8.2f} GiB   ({e.phase}; micro-batches in flight "
            f"{'+'.join(map(str, e.in_flight))})"
            for w, e in zip(where, self.stages, strict=True)
        )


def memory_estimate(
    config: ModelConfig,
    layout: Layout,
    parallel: ParallelConfig | None = None,
    **kwargs: Any,
) -> MemoryEstimate:
    """Peak memory of the most loaded GPU training ``config`` on ``layout`` (embedding extras
    included); its ``pipeline_rank`` says which. Keywords as :func:`memory_plan`'s."""
    return memory_plan(config, layout, parallel, **kwargs).peak


def memory_plan(
    config: ModelConfig,
    layout: Layout,
    parallel: ParallelConfig | None = None,
    *,
    micro_batch_size: int,
    num_microbatches: int | None = None,
    data_parallel: int = 1,
    distributed_optimizer: bool = True,
    grad_reduce_in_fp32: bool = True,
    workspace_bytes: int = WORKSPACE_BYTES,
    plan: StagePlan | None = None,
) -> MemoryPlan:
    """Peak memory of every pipeline rank training ``config`` on ``layout`` at ``parallel`` with
    ``data_parallel`` data-parallel ranks (world = tensor x pipeline x data). ``num_microbatches``
    per step and pipeline rank (None: enough to fill the pipeline, its worst case) decides how
    many a pipeline rank holds at once; ``plan``: the stage plan the model is built with
    (default nam-layout's ``plan_stages`` at the parallel sizes)."""
    parallel = parallel or ParallelConfig()
    validate(config, layout, parallel)
    counts = (("micro_batch_size", micro_batch_size), ("data_parallel", data_parallel))
    if num_microbatches is not None:
        counts += (("num_microbatches", num_microbatches),)
    for name, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecConfigError(f"memory_estimate: {name} must be a positive integer, got {value!r}")
    tp, pp, vp = parallel.tensor, parallel.pipeline, parallel.virtual_pipeline
    ep, etp = parallel.expert, parallel.expert_tensor_size
    if (tp * data_parallel) % (ep * etp):
        raise SpecConfigError(
            f"memory_estimate: parallel.expert {ep} x expert tensor size {etp} does not divide tensor x "
            f"data = {tp} x {data_parallel} (megatron's expert grid: world = expert tensor x expert x "
            "pipeline x expert data)"
        )
    if vp > 1 and num_microbatches is not None and num_microbatches % pp:
        raise SpecConfigError(
            f"memory_estimate: {num_microbatches} micro-batches per step is not a multiple of parallel.pipeline "
            f"{pp}: megatron's interleaved schedule (parallel.virtual_pipeline {vp}) runs them in groups of "
            "the pipeline size"
        )
    if plan is None:
        try:
            plan = plan_stages(layout, pp, vp)
        except LayoutError as err:
            raise SpecConfigError(f"parallel.pipeline {pp}, parallel.virtual_pipeline {vp}: {err}") from err
    elif (plan.layout, plan.stages, plan.virtual) != (layout, pp, vp):
        raise SpecConfigError(
            f"memory_estimate: the stage plan ({plan.stages} stages x {plan.virtual} virtual) is not of this "
            f"layout at parallel.pipeline {pp} x parallel.virtual_pipeline {vp}"
        )
    p_bytes = activation_bytes(config)
    shards = (data_parallel, tp * data_parallel // (ep * etp)) if distributed_optimizer else (1, 1)
    per_param = (4 if p_bytes < 4 else 0) + 8  # fp32 main copy (fp32 parameters are their own), m, v
    # (kept under the letter's policy, kept without recompute) of one layer of each letter
    layer_bytes = {
        key: tuple(
            layer_activation_bytes(config, key, micro_batch_size, policy, parallel)
            for policy in (config.recompute_for(key), "none")
        )
        for key, n in layout.counts.items()
        if n
    }
    output_peak = output_bytes(config, micro_batch_size, parallel)
    output_kept = output_kept_bytes(config, micro_batch_size, parallel)
    mtp_kept = config.mtp_depth * (
        sum(
            layer_activation_bytes(config, key, micro_batch_size, config.recompute_for(key), parallel)
            for key in MTP_LETTERS
        )
        + 2 * norm_bytes(config, sequence_shard(config.seq_length * micro_batch_size, parallel))
        + output_kept
    )
    stages = []
    for rank in range(pp):
        params = rank_params(config, plan, parallel, rank)
        # bytes of one micro-batch of each virtual stage's layers, per letter
        chunks = [
            {key: layer_bytes[key][0] * kinds.count(key) for key in dict.fromkeys(kinds)}
            for kinds in (plan.chunk_kinds(rank, v) for v in range(vp))
        ]
        holds_output = plan.chunk_index(rank, vp - 1) == len(plan.chunks) - 1
        sizes = [sum(c.values()) for c in chunks]
        if holds_output:
            sizes[-1] += output_kept + mtp_kept
        held = _held_at_peak(pp, vp, rank, num_microbatches, sizes)
        present = [key for key in layer_bytes if any(key in c for c in chunks)]
        activations = {
            key: sum(h * c.get(key, 0) for h, c in zip(held, chunks, strict=True)) for key in present
        }
        if holds_output and mtp_kept:
            activations["mtp"] = held[-1] * mtp_kept
        output = output_peak + (held[-1] - 1) * output_kept if holds_output else 0
        # backward re-runs one recomputed layer at a time
        transient = max((layer_bytes[key][1] - layer_bytes[key][0] for key in present), default=0)
        stages.append(
            MemoryEstimate(
                weights=params.total * p_bytes,
                grads=params.total * (4 if grad_reduce_in_fp32 else p_bytes),
                optimizer_state=_shard_bytes(params.dense, params.expert, per_param, shards),
                activations=activations,
                output=output,
                transient=max(0, transient - output),
                allowance=workspace_bytes,
                step_scratch=_shard_bytes(params.dense, params.expert, 4, shards),
                notes={
                    "shape": f"micro-batch {micro_batch_size} x seq {config.seq_length}, {config.dtype_name}, "
                    f"data parallel {data_parallel}, distributed optimizer {'on' if distributed_optimizer else 'off'}",
                    "params": f"{params.total:,}",
                },
                pipeline_rank=rank,
                in_flight=held,
            )
        )
    return MemoryPlan(tuple(stages), tp * pp * data_parallel)


def _shard_bytes(dense: int, expert: int, per_param: int, shards: tuple[int, int]) -> int:
    """``per_param`` bytes of each parameter over its shard count (dense, expert), rounded up once."""
    dp, edp = shards
    return -(-(dense * per_param * edp + expert * per_param * dp) // (dp * edp))


def _schedule(pipeline: int, virtual: int, rank: int, num_microbatches: int) -> list[tuple[bool, int]]:
    """The order in which pipeline rank ``rank`` runs (forward?, virtual stage) of one step under
    megatron-core's 1F1B schedule (``virtual`` 1) or its interleaved one: the warm-up forwards,
    then one forward and one backward at a time, then the remaining backwards. Interleaved, the
    micro-batches (a multiple of ``pipeline``, as megatron requires) run in groups of ``pipeline``
    per virtual stage (``get_schedule_table`` at megatron's default group size); backwards run the
    virtual stages in reverse."""
    total = num_microbatches * virtual
    if virtual == 1:
        warmup, table = min(pipeline - rank - 1, total), [0] * total
    else:
        warmup = min(2 * (pipeline - rank - 1) + (virtual - 1) * pipeline, total)
        groups = num_microbatches // pipeline
        table = [v for _ in range(groups) for v in range(virtual) for _ in range(pipeline)]
    order = [(True, table[k]) for k in range(warmup)]
    for k in range(total - warmup):
        order += [(True, table[k + warmup]), (False, virtual - 1 - table[k])]
    order += [(False, virtual - 1 - table[k]) for k in range(total - warmup, total)]
    return order


def _held_at_peak(
    pipeline: int, virtual: int, rank: int, num_microbatches: int | None, sizes: Sequence[int]
) -> tuple[int, ...]:
    """Micro-batches held per virtual stage when rank ``rank`` holds the most activation bytes,
    one micro-batch of virtual stage v weighing ``sizes[v]``; ``num_microbatches`` None: enough that
    the schedule reaches its steady state and runs through a whole period of it."""
    if num_microbatches is None:
        warmup = 2 * (pipeline - 1) + (virtual - 1) * pipeline if virtual > 1 else pipeline - 1
        num_microbatches = pipeline * (math.ceil((warmup + 1) / (virtual * pipeline)) + 1)
    held, best, best_held = [0] * virtual, -1, (1,) * virtual
    for forward, v in _schedule(pipeline, virtual, rank, num_microbatches):
        held[v] += 1 if forward else -1
        if forward and (now := sum(h * s for h, s in zip(held, sizes, strict=True))) > best:
            best, best_held = now, tuple(held)
    return best_held


def layer_activation_bytes(
    config: ModelConfig,
    letter: str,
    micro_batch: int,
    policy: Recompute = "none",
    parallel: ParallelConfig | None = None,
) -> int:
    """Bytes one layer of ``letter`` keeps for backward on one rank at ``seq_length`` x
    ``micro_batch`` (the letter module's formula, :meth:`nam_spec.letters.base.Letter.activations`)."""
    return letter_block(letter).activations(config, micro_batch, policy, parallel)


def output_kept_bytes(config: ModelConfig, micro_batch: int, parallel: ParallelConfig | None = None) -> int:
    """What one micro-batch's output keeps until its backward on one rank: the final norm's tensors
    (its sequence shard) and, whole logits at once, the fp32 softmax of the vocabulary shard over
    the whole sequence; chunked (``model.loss_chunk_tokens``), the input gathered over the sequence
    (under sequence parallelism; else it is the norm's output), the fp32 log-sum-exp and the int64
    labels per token."""
    parallel = parallel or ParallelConfig()
    t = config.seq_length * micro_batch
    norm = norm_bytes(config, sequence_shard(t, parallel))
    if not config.loss_chunk_tokens:
        return norm + 4 * t * (config.vocab_size // parallel.tensor)
    gathered = activation_bytes(config) * t * config.hidden_size if sequence_shard(t, parallel) < t else 0
    return norm + gathered + 12 * t


def output_bytes(config: ModelConfig, micro_batch: int, parallel: ParallelConfig | None = None) -> int:
    """Final norm, output layer and cross entropy at their peak. Whole logits at once: the logits in
    the activation dtype beside their fp32 copy (megatron's vocab-parallel cross entropy upcasts,
    then turns the copy into the saved softmax in place; backward casts its gradient back, the same
    two again). Chunked, in backward (nam_spec.cross_entropy): one chunk's fp32 softmax beside its
    gradient in the activation dtype, the input gradient and one chunk's weight-gradient product,
    beside their fp32 sum when there are several chunks."""
    parallel = parallel or ParallelConfig()
    a = activation_bytes(config)
    t, vocab = config.seq_length * micro_batch, config.vocab_size // parallel.tensor
    kept = output_kept_bytes(config, micro_batch, parallel)
    if not config.loss_chunk_tokens:
        return kept + (a * t * vocab if a < 4 else 0)
    chunk = min(config.loss_chunk_tokens, t) * vocab * (4 + (a if a < 4 else 0))
    weight_grad = (a + (4 if t > config.loss_chunk_tokens else 0)) * vocab * config.hidden_size
    return kept + chunk + a * t * config.hidden_size + weight_grad

"""Per-GPU peak memory of a megatron-core training step, from the geometry alone (no tensors).

What is counted, in bytes, as ``torch.cuda.max_memory_allocated`` sees it:

- weights: every parameter in the parameter dtype (megatron DDP's contiguous param buffer);
- grads: megatron DDP's gradient buffer, fp32 (``grad_reduce_in_fp32``) or the parameter dtype;
- optimizer state: fp32 main parameters (only when parameters are bf16/fp16; fp32 parameters are
  their own main copy) plus Adam's m and v in fp32, divided over data-parallel ranks by the
  distributed optimizer;
- activations per letter: the tensors each layer's autograd graph keeps for backward on the
  local backend's CUDA paths at ``seq_length`` x micro-batch (one micro-batch in flight: no
  pipeline), derived term by term below from what each module saves, under the letter's
  recompute policy;
- output: final norm, output layer and megatron's vocab-parallel cross entropy at its peak (the
  logits in the activation dtype plus their fp32 copy, which becomes the saved softmax);
- transient: how far re-running one recomputed layer in backward goes beyond the output's peak;
- allowance: a fixed :data:`WORKSPACE_BYTES` for what the formula does not follow (cuBLAS/cuBLASLt
  workspaces, which torch takes from its caching allocator; Triton and flash-attention scratch;
  small temporaries of norms and the router; the n-gram/structure embedding's own activations,
  under 1 KB a token). Allocator fragmentation is not in ``max_memory_allocated`` and not here:
  reserved memory (nvidia-smi) runs higher by it.

The peak is the larger of two moments: the forward/backward peak (the loss of the last
micro-batch, with every layer's activations held) and ``optimizer.step()``, where torch's
foreach Adam (megatron's choice without Transformer Engine or apex) takes one fp32 temporary the
size of the local shard (``sqrt(v)``).

Calibration: bench/trainer.py on one H200, preset ``nam56r-small`` (hidden 2048, local
backend, bf16, distributed optimizer on one rank, seq 4096, n-gram and structure extras of 128.7 M
parameters), ``torch.cuda.max_memory_allocated`` against this estimate:

    no recompute, micro-batch 1        measured 44.6 GiB   estimate 44.8 GiB   +0.4%
    selective recompute, micro-batch 1 measured 43.3 GiB   estimate 43.5 GiB   +0.4%
    selective, micro-batch 2           measured 51.5 GiB   estimate 51.7 GiB   +0.3%
    selective, micro-batch 4           measured 67.9 GiB   estimate 68.1 GiB   +0.3%

(micro-batches 2 and 4: the peak less what earlier runs of that process still held). Tests pin
each within 5%. The model covers tensor = pipeline = expert parallel = 1 and says so for
anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nam_layout import Layout
from nam_spec.accounting import model_params
from nam_spec.config import ModelConfig, ParallelConfig, Recompute, SpecConfigError
from nam_spec.letters import letter as letter_block
from nam_spec.letters.base import activation_bytes, norm_bytes
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
    activations: dict[str, int]  # letter -> all layers of that letter
    output: int
    transient: int
    allowance: int
    step_scratch: int
    notes: dict[str, str] = field(default_factory=dict)

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
        phase = "forward/backward" if self.backward_peak >= self.step_peak else "optimizer step"
        lines.append(f"  {'forward/backward peak':<22} {self.backward_peak / GIB:>8.2f}")
        lines.append(
            f"  {'optimizer-step peak':<22} {self.step_peak / GIB:>8.2f}   "
            f"(Adam scratch {self.step_scratch / GIB:.2f})"
        )
        lines.append(f"  {'peak':<22} {self.total_gib:>8.2f}   ({phase})")
        lines += [f"  {k}: {v}" for k, v in self.notes.items()]
        return "\n".join(lines)


def memory_estimate(
    config: ModelConfig,
    layout: Layout,
    parallel: ParallelConfig | None = None,
    *,
    micro_batch_size: int,
    data_parallel: int = 1,
    distributed_optimizer: bool = True,
    grad_reduce_in_fp32: bool = True,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> MemoryEstimate:
    """Peak memory of one GPU training ``config`` on ``layout`` (embedding extras included)."""
    parallel = parallel or ParallelConfig()
    validate(config, layout, parallel)
    for name, value in (("micro_batch_size", micro_batch_size), ("data_parallel", data_parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecConfigError(f"memory_estimate: {name} must be a positive integer, got {value!r}")
    split = {"tensor": parallel.tensor, "pipeline": parallel.pipeline, "expert": parallel.expert}
    if any(v != 1 for v in split.values()):
        given = ", ".join(f"parallel.{k} {v}" for k, v in split.items())
        raise SpecConfigError(
            f"memory_estimate covers parallel.tensor = pipeline = expert = 1 (data parallel any); got {given}"
        )
    p_bytes = activation_bytes(config)
    params = model_params(config, layout).total
    shards = data_parallel if distributed_optimizer else 1
    main = 4 if p_bytes < 4 else 0  # fp32 parameters are their own main copy
    activations, transient = {}, 0
    for letter, n in layout.counts.items():
        if not n:
            continue
        policy = config.recompute_for(letter)
        kept = layer_activation_bytes(config, letter, micro_batch_size, policy)
        activations[letter] = n * kept
        if policy != "none":  # backward re-runs one layer at a time
            transient = max(transient, layer_activation_bytes(config, letter, micro_batch_size) - kept)
    output = output_bytes(config, micro_batch_size)
    return MemoryEstimate(
        weights=params * p_bytes,
        grads=params * (4 if grad_reduce_in_fp32 else p_bytes),
        optimizer_state=math.ceil(params * (main + 8) / shards),
        activations=activations,
        output=output,
        transient=max(0, transient - output),
        allowance=workspace_bytes,
        step_scratch=math.ceil(params * 4 / shards),
        notes={
            "shape": f"micro-batch {micro_batch_size} x seq {config.seq_length}, {config.dtype_name}, "
            f"data parallel {data_parallel}, distributed optimizer {'on' if distributed_optimizer else 'off'}",
            "params": f"{params:,}",
        },
    )


def layer_activation_bytes(
    config: ModelConfig, letter: str, micro_batch: int, policy: Recompute = "none"
) -> int:
    """Bytes one layer of ``letter`` keeps for backward at ``seq_length`` x ``micro_batch`` (the
    letter module's formula, :meth:`nam_spec.letters.base.Letter.activations`)."""
    return letter_block(letter).activations(config, micro_batch, policy)


def output_bytes(config: ModelConfig, micro_batch: int) -> int:
    """Final norm, output layer and cross entropy at their peak: the logits in the activation dtype
    beside their fp32 copy (megatron's vocab-parallel cross entropy upcasts, then turns the copy into
    the saved softmax in place; backward casts its gradient back, the same two again)."""
    a = activation_bytes(config)
    t = config.seq_length * micro_batch
    logits = a * t * config.vocab_size + (4 * t * config.vocab_size if a < 4 else 0)
    return norm_bytes(config, t) + logits

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

Calibration: bench/trainer.py on one H200, trainer preset ``nam56r-small`` (hidden 2048, local
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
from nam_spec.config import ModelConfig, Recompute, SpecConfigError, validate

GIB = 2**30
WORKSPACE_BYTES = 256 * 2**20  # the documented allowance (module docstring)
M2RNN_CHECKPOINT_STEPS = 32  # nam_mixers M2RNNKernelConfig.chunk: the scan stores its state this often
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
    *,
    micro_batch_size: int,
    data_parallel: int = 1,
    distributed_optimizer: bool = True,
    extra_params: int = 0,
    grad_reduce_in_fp32: bool = True,
    workspace_bytes: int = WORKSPACE_BYTES,
) -> MemoryEstimate:
    """Peak memory of one GPU training ``config`` on ``layout``; ``extra_params`` are parameters
    the formula does not know (the n-gram and structure embeddings)."""
    validate(config, layout)
    for name, value in (("micro_batch_size", micro_batch_size), ("data_parallel", data_parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecConfigError(f"memory_estimate: {name} must be a positive integer, got {value!r}")
    if extra_params < 0:
        raise SpecConfigError(f"memory_estimate: extra_params must be >= 0, got {extra_params}")
    split = {
        "tensor_parallel": config.tensor_parallel,
        "pipeline_parallel": config.pipeline_parallel,
        "expert_parallel": config.expert_parallel,
    }
    if any(v != 1 for v in split.values()):
        given = ", ".join(f"{k} {v}" for k, v in split.items())
        raise SpecConfigError(
            f"memory_estimate covers tensor_parallel = pipeline_parallel = expert_parallel = 1 "
            f"(data parallel any); got {given}"
        )
    p_bytes = _BYTES[config.params_dtype]
    params = model_params(config, layout).total + extra_params
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
            "shape": f"micro-batch {micro_batch_size} x seq {config.seq_length}, {config.params_dtype}, "
            f"data parallel {data_parallel}, distributed optimizer {'on' if distributed_optimizer else 'off'}",
            "params": f"{params:,} ({extra_params:,} outside the formula)",
        },
    )


def layer_activation_bytes(
    config: ModelConfig, letter: str, micro_batch: int, policy: Recompute = "none"
) -> int:
    """Bytes one layer of ``letter`` keeps for backward at ``seq_length`` x ``micro_batch``.

    Every layer keeps its input (the residual stream, saved by its norm or, under "full", by the
    checkpoint); the rest is what its modules save on the local backend's CUDA paths, in the
    activation dtype ``a`` (the parameter dtype) unless noted fp32.
    """
    a = _BYTES[config.params_dtype]
    s, h = config.seq_length, config.hidden_size
    t = s * micro_batch  # tokens
    layer_input = a * t * h
    if policy == "full":
        return layer_input
    selective = policy == "selective"
    norm = (
        layer_input + 4 * t + a * t * h
    )  # input and fp32 rstd (F.rms_norm), output (the next linear's input)
    if letter == "A":
        att, hn = config.attention, config.head_dim
        np_, ng = att.num_heads, att.num_kv_heads
        qkv = a * t * (np_ + 2 * ng) * hn  # linear_qkv's output stays whole: value is a view of it
        rotated = a * t * (np_ + ng) * hn  # query and key after RoPE (new tensors, saved by SDPA)
        rope = 4 * a * s * hn  # cos and sin tables for query and key
        out = a * t * np_ * hn  # SDPA output, laid out as its query: linear_proj's input without a copy
        lse = 4 * t * np_  # flash attention's fp32 log-sum-exp; the core_attn checkpoint drops only it
        return norm + qkv + rotated + rope + out + (0 if selective else lse)
    if letter == "E":
        m = config.moe
        tk, f, e = t * m.top_k, m.ffn_hidden_size, m.num_experts
        # router (fp32): two sigmoid outputs (routing, aux loss), the probs' transposed copy, the bool
        # routing map; top-k indices twice (int64), the gathered top-k scores and their sums
        router = 3 * 4 * t * e + t * e + 2 * 8 * tk + 4 * tk + 2 * 4 * t
        permutation = 8 * tk + 4 * tk  # sorted indices (int64), permuted probs (fp32)
        permuted = a * tk * h  # the experts' sorted input (saved by fc1's grouped_mm)
        fc1 = a * tk * 2 * f  # gate and up, kept by the SwiGLU
        swiglu = 2 * a * tk * f  # silu(gate), silu(gate) * up; the moe_act checkpoint drops both
        fc2_in = a * tk * f  # SwiGLU x prob, fc2's input
        shared = a * t * 5 * m.shared_ffn_hidden_size  # megatron MLP, as the '-' letter's
        experts = permuted + fc1 + (0 if selective else swiglu) + fc2_in
        return norm + router + permutation + experts + shared
    if letter == "-":
        f = config.ffn_hidden_size
        # megatron's SwiGLU: fc1 output [2F], silu(gate) [F], up + glu_linear_offset [F], product [F]
        mlp = a * t * 5 * f  # (fc2's input); the "mlp" checkpoint keeps none of them
        return norm + (0 if selective else mlp)
    if letter == "M":
        mc = config.mamba
        di = mc.expand * h
        d_in_proj = 2 * di + 2 * mc.ngroups * mc.d_state + di // mc.head_dim
        zxbcdt = a * t * d_in_proj  # in_proj output, saved whole by mamba_split_conv1d_scan_combined
        core = a * t * di + 4 * t * mc.ngroups  # its pre-norm y and fp32 group rstd; conv recomputed
        out = a * t * di  # out_proj's input
        return norm + zxbcdt + (0 if selective else core) + out
    if letter == "R":
        r = config.m2rnn
        hv, qk = r.num_heads * r.head_dim_v, 2 * r.num_qk_heads * r.head_dim_k
        qk_proj = a * t * qk  # q/k projection output (the conv's input; the checkpoint's too)
        out = a * t * hv  # out_proj's input
        vgf = a * t * r.num_heads * (2 * r.head_dim_v + 1)  # in_proj output: v, g, x_f per head
        if selective:  # the core checkpoint keeps its two inputs only
            return norm + qk_proj + vgf + out
        q_k = a * t * qk  # conv output split into q and k, made contiguous for the scan
        v = 2 * a * t * hv  # v before the conv (a copy out of in_proj's output) and after
        gate = 3 * 4 * t * r.num_heads  # fp32 forget gate: softplus input and output, f
        steps = micro_batch * math.ceil(s / M2RNN_CHECKPOINT_STEPS)
        states = 4 * steps * r.num_heads * r.head_dim_k * r.head_dim_v  # the scan's fp32 state checkpoints
        # the fp32 epilogue: (y + D v) * silu(g), then the per-head RMSNorm, keeps six [t, hv] tensors
        # (g and v upcast, the sum, silu(g), the product, the normed product) and the rsqrt per head;
        # in fp32 the upcasts are no-ops: g stays a view that keeps in_proj's output, v is the saved v
        epilogue = (6 * 4 * t * hv if a < 4 else 4 * 4 * t * hv + vgf) + 4 * t * r.num_heads
        return norm + qk_proj + q_k + v + gate + states + epilogue + out
    raise KeyError(f"no activation formula for letter {letter!r}; letters: A E M R -")


def output_bytes(config: ModelConfig, micro_batch: int) -> int:
    """Final norm, output layer and cross entropy at their peak: the logits in the activation dtype
    beside their fp32 copy (megatron's vocab-parallel cross entropy upcasts, then turns the copy into
    the saved softmax in place; backward casts its gradient back, the same two again)."""
    a = _BYTES[config.params_dtype]
    t = config.seq_length * micro_batch
    norm = a * t * config.hidden_size + 4 * t + a * t * config.hidden_size
    logits = a * t * config.vocab_size + (4 * t * config.vocab_size if a < 4 else 0)
    return norm + logits

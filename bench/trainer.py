"""A full training step of nam56r-small on one H200, beside megatron-core's own HybridModel at the
same shape in the same run (each model in a process of its own, bench.world.in_fresh_process): tokens/s,
model TFLOP/s, MFU, peak memory, and a profile of ours.

    NAM_COMMIT=<sha> bash bench/gpu.sh trainer

Models. Ours: ``nam_spec.build_model`` of the trainer's ``nam56r-small`` preset (NAM56R pattern
AEMEAEMEAEMR x 52 layers, hidden 2048, 32/8 heads of 64, 16 experts top-4 of FFN 512 + shared
576, Mamba state 64 / head 64 / 8 groups, M2RNN 24 heads of 16 with one q/k head of 64, vocab
65536, untied output, n-gram hash (orders 2 and 3, 8 heads, ~500 k rows, dim 16) and structure
channels (bottleneck 64) on), local backend, bf16 parameters built on the GPU, no activation
recomputation (the preset's selective recomputation is switched off, as in the baseline). Baseline:
megatron-core 0.19.2's ``HybridModel`` at the same width, depth and MoE geometry with the
pattern translated by ``nam_layout.to_megatron`` (R as M), on a local spec (no Transformer
Engine: MambaLayer with torch RMSNorm and MambaMixer on Column/RowParallelLinear; attention and
MoE layers from ``get_gpt_layer_local_submodules``; torch RMSNorm for the final norm;
``masked_softmax_fusion=False``, ``use_mamba_mem_eff_path=False``, sequential experts), wrapped in
megatron's Float16Module as megatron's own training does; plain word embedding (it has no extras).

Set-up (both): the trainer's own, ``nam_trainer.train.setup.build_run`` on the preset (megatron's
model through its ``build`` argument): megatron DDP (gradients reduced in an fp32 buffer) and
megatron's optimizer (Adam, fp32 main parameters, distributed optimizer on one rank, the preset's
clipping, weight decay with nam-spec's no-weight-decay rule, a constant lr of LR: no warm-up and a
decay horizon far beyond the benchmark's steps). Step (both):
``get_forward_backward_func`` over MICROBATCHES micro-batches of MICRO_BATCH x 4096
random tokens (the same fixed batch every step), then ``optimizer.step()``. Micro-batch 1: the
baseline holds ~55 GiB of activations per 4096-token row (GPU.md) beside ~38 GiB of parameters,
gradients and Adam state, so 1 row keeps both near 100 GiB. WARMUP_STEPS, then the median of
TIMED_STEPS wall times between ``torch.cuda.synchronize`` calls.

FLOPs: ``nam_spec.accounting.model_flops_per_token`` (DESIGN.md), printed per letter in the log:
6 x active matmul weights per token (experts at top-k / experts, router, shared expert, the
output layer; not the embedding lookups, n-gram/structure projections or norms) plus 6 x seq x
query heads x head dim per attention layer (causal half of the dense 12); SSM and M2RNN scans
are not counted. Floor per step: those FLOPs over 700 TFLOP/s (bench/ceilings.py median); MFU
against 989 TFLOP/s (H200 dense bf16 datasheet) and against 700.

Checks first (report.check): built parameters against the accounting formula; initial loss
against ln(V) + init_std^2 x hidden / 2 = 11.50 (uniform logits give ln V = 11.09; the output
layer's N(0, 0.02) weights on unit-RMS hidden states give logits of variance 0.82); every loss
finite; ours drops on the fixed batch within five steps. Then a torch.profiler trace of
PROFILE_STEPS of ours: top kernels by GPU time and GPU time per letter (record_function ranges
opened around each layer's forward and, by gradient hooks, its backward), printed and written to
$OUT/trainer_profile_ours.txt.

Levers (issue "Throughput"): each LEVERS entry (keys such as model.cuda_graphs) is set against the preset (a lever that is
on by default set back to the path before it, or one still off by default set on) and ours is
timed again at micro-batch 1: a row each, the step-time ratio to ours as configured, and two checks
against ours: the gradient of every parameter at step 0 (GRAD_TOL, ROUTER_GRAD_TOL; a lever computes the same
function, so only bf16 rounding in another summation order may differ) and the losses of every
step (LEVER_LOSS_TOL); a lever that needs another setting too (EAGER_TWINS: graphs need the local
dispatcher) gets the same two checks against the run with that setting alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import Report
from bench.world import in_fresh_process

if TYPE_CHECKING:
    from nam_layout import Layout
    from nam_spec import ModelConfig

PRESET = "nam56r-small"
MICRO_BATCH = 1
MICROBATCHES = 4
LARGER_MICRO_BATCHES = (2, 4)  # ours only (megatron's needs ~108 GiB at 1); each where its estimate fits
MEGATRON_GIB = 108  # megatron-core's HybridModel at micro-batch 1, measured on the H200 (GPU.md)
WARMUP_STEPS = 2
TIMED_STEPS = 8  # with the warm-up, the first 10 steps whose losses the levers are checked on
EMBEDDING = "embedding"  # the profile's range name for the embedding (not a letter)
PROFILE_STEPS = 1  # of MICROBATCHES micro-batches; summarising the trace costs CPU time per event
DROP_AFTER = 5  # steps on the fixed batch after which our loss must have dropped
# Adam's first steps move every weight by about the lr whatever the gradient's size, so at the
# preset's peak (6e-4, no warm-up) the fixed batch's loss jumped up at steps 2, 4 and 7 and those
# jumps turned bf16 rounding into losses 5e-3 apart between two runs of ours alone (H100,
# 2026-12-07); at LR a step's overshoot (quadratic in the lr) is ~36x smaller
LR = 1e-4
# what the benchmark sets against the preset (bench/trainer_cli.py runs nam-train with the same)
OVERRIDES = {
    "model.params_dtype": "bfloat16",
    "model.recompute": "none",
    "training.warmup_steps": "0",
    "training.lr": str(LR),
    "training.steps": "1000000",
    "parallel.distributed_optimizer": "true",
}
# CUDA graphs per layer for M, R and E (nam_spec.graphs); E's capture needs the local dispatcher
GRAPHED = {"model.moe.dispatcher": "local", "model.cuda_graphs": "MRE"}
# throughput levers, each keys set against the preset's values and timed at micro-batch 1
# beside ours as configured: a lever that landed on by default set back to the path before it,
# or one still off by default (until this row shows it pays) set on. In the order they run: a run
# cut off by its time limit loses the last.
LEVERS = {
    "graphs": GRAPHED,
    "local dispatcher": {"model.moe.dispatcher": "local"},
    "foreach adam": {"training.fused_adam": "false"},
    "no fusion": {"model.gradient_accumulation_fusion": "false"},
}
# a lever that needs another setting too (graphs need the local dispatcher) is also checked against
# the run with that setting alone, where both ran: what the lever itself changes
EAGER_TWINS = {"graphs": "local dispatcher"}
# which cases run (NAM_TRAINER_CASES=profile,graphs for a call with little device time left): ours
# at micro-batch 1 always, profiled with "profile"; the graphs lever (profiled); megatron's model;
# ours at the larger micro-batches; the other levers (NAM_TRAINER_LEVERS names some of them)
CASES = os.environ.get("NAM_TRAINER_CASES", "profile,graphs,megatron,larger,levers").split(",")
CHOSEN_LEVERS = os.environ.get("NAM_TRAINER_LEVERS", ",".join(LEVERS)).split(",")
LEVER_LOSS_TOL = 2e-2  # relative, per step, on the fixed batch: bf16 gradients summed differently
# per parameter, the relative gradient error |g_lever - g_ours| / |g_ours| as estimated from
# PROJECTIONS random sign vectors r (the mean square of <g_lever - g_ours, r> is the error's squared
# norm): bf16 rounding in another summation order is ~1e-2 at most, a wrong gradient is of order 1
GRAD_TOL = 0.1
PROJECTIONS = 4
# ... except a router's weight, whose bf16 gradient cancels: 12-29% from float64 with either
# dispatcher in nam56r-small cut to 12 layers (bench/moe_dispatch.py), 37% between the dispatchers
# at 52 layers (bench/RESULTS.md); a dropped or negated gradient is still 1 or more
ROUTER = "router.weight"
ROUTER_GRAD_TOL = 0.8
DENSE_BF16_TFLOPS = 989.0  # H200 datasheet, dense bf16
MATMUL_TFLOPS = 700.0  # bench/ceilings.py: torch bf16 8192^3 matmul, do_bench median
TOP_KERNELS = 15
TOP_RANGE_KERNELS = 6  # per letter's forward and backward range
RANGE_PREFIX = "layer "

_T0 = time.monotonic()


def log(message: str) -> None:
    """Progress with wall-clock and elapsed time, so a run cut short still says how far it got."""
    print(f"[trainer {time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:5.0f}s] {message}", flush=True)


def preset(name: str = PRESET, overrides: dict[str, str] | None = None, **model: str) -> Any:
    """The trainer preset, checked for one rank, in bf16 (on the default local backend), with the preset's
    recomputation off (megatron's model keeps all its activations too) and the learning rate held
    at its peak: no warm-up, a cosine decay over a million steps; ``overrides`` sets keys
    ("section.key": value) and ``model`` [model] keys."""
    from nam_trainer.config import check, load_config

    keys = {**OVERRIDES, **(overrides or {}), **{f"model.{key}": value for key, value in model.items()}}
    cfg = load_config(name, overrides=cli_args(keys))
    return check(cfg, world_size=1)


def cli_args(overrides: dict[str, str]) -> list[str]:
    """``{"section.key": value}`` as nam-train's command line (``--section.key value ...``)."""
    return [arg for key, value in overrides.items() for arg in (f"--{key}", value)]


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------


def flop_lines(config: Any, layout: Any) -> list[str]:
    """The FLOP formula per letter with this geometry's numbers, as printed in the log."""
    from nam_spec.accounting import model_flops_per_token, model_params
    from nam_spec.letters import LETTERS

    p = model_params(config, layout)
    lines = [f"{'letter':<7} {'layers':>6} {'matmul weights':>15} {'GFLOP/token/layer':>18}  formula"]
    for letter, n in p.counts.items():
        mm = p.per_letter[letter].matmul_active
        extra = LETTERS[letter].extra_flops_per_token(config)
        flops, formula = 6.0 * mm + extra, f"6 x {mm:,}" + (f" + {extra:,.0f} (attention)" if extra else "")
        lines.append(f"{letter:<7} {n:>6} {mm:>15,} {flops / 1e9:>18.4f}  {formula}")
    output = p.output or p.embedding
    lines.append(f"{'output':<7} {1:>6} {output:>15,} {6.0 * output / 1e9:>18.4f}  6 x {output:,}")
    lines.append(
        f"total {model_flops_per_token(config, layout) / 1e9:.4f} GFLOP per token "
        f"(scans, norms, embedding lookups not counted)"
    )
    return lines


# ------------------------------------------------------------------------------------------------
# The two models
# ------------------------------------------------------------------------------------------------


def megatron_layout(layout: Any) -> Any:
    """The layout megatron builds: R (no megatron block) as M."""
    from nam_layout import Layout

    return Layout.tile(layout.kinds.replace("R", "M"), layout.depth)


def megatron_local_stack_spec(config: Any) -> Any:
    """HybridStack spec from megatron-core's local modules (GPU.md: TE is absent there)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    dense = get_gpt_layer_local_submodules(normalization="RMSNorm")
    moe = get_gpt_layer_local_submodules(
        num_experts=config.moe.num_experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    m = config.mamba
    return ModuleSpec(
        module=HybridStack,
        # upstream hard-wires TENorm as the final norm: build without it, add torch's after
        params={"post_layer_norm": False},
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=WrappedTorchNorm,
                    mixer=ModuleSpec(
                        module=MambaMixer,
                        params={"expand": m.expand, "d_conv": m.conv_width, "chunk_size": m.chunk_size},
                        submodules=MambaMixerSubmodules(
                            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear
                        ),
                    ),
                    mamba_bda=get_bias_dropout_add,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=dense.input_layernorm,
                    self_attention=dense.self_attention,
                    self_attn_bda=dense.self_attn_bda,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=dense.pre_mlp_layernorm, mlp=dense.mlp, mlp_bda=dense.mlp_bda
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=moe.pre_mlp_layernorm, mlp=moe.mlp, mlp_bda=moe.mlp_bda
                ),
            ),
        ),
    )


def megatron_config(config: ModelConfig, layout: Layout) -> Any:
    from nam_spec.transformer_config import transformer_config

    m = config.mamba
    return dataclasses.replace(
        transformer_config(config, megatron_layout(layout)),
        moe_grouped_gemm=False,  # its grouped path needs TE or the grouped_gemm package
        use_mamba_mem_eff_path=False,
        mamba_state_dim=m.d_state,
        mamba_head_dim=m.head_dim,
        mamba_num_groups=m.ngroups,
    )


def build_megatron(config: ModelConfig, layout: Layout) -> Any:
    """megatron-core's HybridModel, local spec, in Float16Module as megatron's training wraps it."""
    import torch
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from nam_layout import to_megatron

    tc = megatron_config(config, layout)
    model = HybridModel(
        tc,
        megatron_local_stack_spec(config),
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        hybrid_layer_pattern=to_megatron(layout, map_letters={"R": "M"}),
        share_embeddings_and_output_weights=not config.untie_output,
        position_embedding_type="rope",
        rotary_base=int(config.attention.rope_base),
    )
    model.decoder.final_norm = WrappedTorchNorm(
        config=tc, hidden_size=tc.hidden_size, eps=tc.layernorm_epsilon
    )
    model.decoder.post_layer_norm = True
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return Float16Module(tc, model) if tc.bf16 or tc.fp16 else model


# ------------------------------------------------------------------------------------------------
# Training step
# ------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    run: Any  # nam_trainer.train.setup.Run
    batches: list[dict[str, Any]]
    seq_length: int
    # the first step's gradients, before the optimizer reads them (gradient_fingerprint)
    first_gradients: dict[str, tuple[float, ...]] | None = None

    @property
    def tokens_per_step(self) -> int:
        return sum(b["input_ids"].numel() for b in self.batches)

    def step(self) -> tuple[Any, Any]:
        """One optimizer step over all micro-batches -> (mean lm loss, grad norm), on device."""
        import torch
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for chunk in self.run.chunks:
            chunk.zero_grad_buffer()
        self.run.optimizer.zero_grad()
        stats = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(self.batches),
            model=self.run.chunks,
            num_microbatches=len(self.batches),
            seq_length=self.seq_length,
            micro_batch_size=self.batches[0]["input_ids"].shape[0],
            forward_only=False,
        )
        if self.first_gradients is None:
            self.first_gradients = gradient_fingerprint(self.run.chunks)
        _, grad_norm, _ = self.run.optimizer.step()
        return torch.stack([s["lm loss"] for s in stats]).mean(), grad_norm


def gradient_fingerprint(chunks: list[Any]) -> dict[str, tuple[float, ...]]:
    """Each parameter's gradient as (norm, <gradient, r_1>, ..., <gradient, r_PROJECTIONS>) with
    r_i random +-1 vectors seeded by the parameter's name, so that two models built alike compare
    name by name; the gradient is DDP's fp32 ``main_grad`` (where megatron's fused accumulation and
    graphed layers write it)."""
    import zlib

    import torch

    prints = {}
    for chunk in chunks:
        for name, param in chunk.module.named_parameters():
            grad = getattr(param, "main_grad", None)
            grad = (param.grad if grad is None else grad).detach().reshape(-1)
            gen = torch.Generator(device=grad.device).manual_seed(zlib.crc32(name.encode()))
            projections = torch.zeros(PROJECTIONS, device=grad.device, dtype=torch.float64)
            squares = torch.zeros((), device=grad.device, dtype=torch.float64)
            for part in grad.split(2**24):  # the sign vectors of the output layer whole: 4 GiB
                part = part.double()
                signs = torch.empty(PROJECTIONS, part.numel(), device=grad.device, dtype=torch.float64)
                projections += signs.bernoulli_(0.5, generator=gen).mul_(2).sub_(1) @ part
                squares += part.square().sum()
            prints[name] = (float(squares.sqrt()), *projections.tolist())
    return prints


def gradient_difference(
    lever: dict[str, tuple[float, ...]], ours: dict[str, tuple[float, ...]], routers: bool
) -> tuple[float, str]:
    """The largest relative gradient error over the router weights (``routers``) or the other
    parameters, and its parameter: per parameter, the larger of |norm - norm_ours| / norm_ours (a
    lower bound) and the projections' estimate rms_i <g - g_ours, r_i> / norm_ours; inf where a
    parameter is missing or non-finite."""
    worst, where = 0.0, ""
    chosen = {n: v for n, v in ours.items() if n.endswith(ROUTER) == routers}
    for name, (norm, *projections) in chosen.items():
        other = lever.get(name)
        if other is None or not all(map(math.isfinite, other)):
            return math.inf, name
        spread = math.sqrt(
            sum((a - b) ** 2 for a, b in zip(other[1:], projections, strict=True)) / PROJECTIONS
        )
        error = max(abs(other[0] - norm), spread) / norm if norm > 0 else (0.0 if other[0] == 0 else math.inf)
        if error > worst:
            worst, where = error, name
    if missing := {n for n in lever if n.endswith(ROUTER) == routers} - set(chosen):
        return math.inf, sorted(missing)[0]
    return worst, where


def _forward_step(data_iterator: Iterator[dict[str, Any]], model: Any) -> tuple[Any, Callable]:
    return model(**next(data_iterator)), _loss


def _loss(per_token: Any) -> tuple[Any, dict[str, Any]]:
    loss = per_token.float().mean()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides the loss in place


def make_batches(
    config: ModelConfig, micro_batch: int, count: int, with_extras: bool, seed: int = 0
) -> list[dict]:
    """Random tokens (and structure channels where the embedding has them), one dict of model
    keyword arguments per micro-batch; labels are the inputs shifted by one."""
    import torch

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    gen = torch.Generator(device=device).manual_seed(seed)
    seq, vocab = config.seq_length, config.vocab_size
    position_ids = torch.arange(seq, device=device).expand(micro_batch, seq)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (micro_batch, seq + 1), device=device, generator=gen)
        batch: dict[str, Any] = {
            "input_ids": tokens[:, :-1].contiguous(),
            "position_ids": position_ids,
            "attention_mask": None,
            "labels": tokens[:, 1:].contiguous(),
        }
        structure = config.embedding.structure_config() if with_extras else None
        if structure is not None:
            batch["structure"] = {
                name: torch.randint(
                    0, structure.schema[name].vocab, (micro_batch, seq), device=device, generator=gen
                )
                for name in structure.channels
            }
        batches.append(batch)
    return batches


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def train(name: str, trainer: Trainer, steps: int) -> tuple[list[float], list[float]]:
    """Run ``steps`` steps; per-step losses and wall milliseconds (synchronised around each)."""
    losses, times = [], []
    for i in range(steps):
        _sync()
        start = time.perf_counter()
        loss, grad_norm = trainer.step()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(float(loss))
        log(f"{name} step {i}: loss {losses[-1]:.4f} grad norm {float(grad_norm):.3g} {times[-1]:.0f} ms")
    return losses, times


# ------------------------------------------------------------------------------------------------
# Per-letter profiler ranges
# ------------------------------------------------------------------------------------------------


class LetterRanges:
    """record_function ranges around each layer: ``layer fwd X`` from a forward pre-hook to the
    forward hook; ``layer bwd X`` from the gradient of the layer's output to the gradient of its
    input (tensor hooks, on the autograd thread). One backward range is open at a time: the next
    opens by closing the last, since layer k's input is layer k-1's output. A replayed layer
    (``graphs``, the stack's nam_spec.graphs) calls no module hook: the same ranges open around
    its replay, whose kernels the profiler ties to the graph launch inside them."""

    def __init__(self, layers: list[tuple[str, Any]], graphs: dict[int, Any] | None = None) -> None:
        self._handles: list[Any] = []
        self._open: tuple[int, Any] | None = None
        self._closer_queued = False
        self._graphs = {} if graphs is None else graphs
        self._unranged = dict(self._graphs)
        graph_of = {id(graph.layer): key for key, graph in self._graphs.items()}
        for index, (letter, layer) in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(index, letter), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post(index, letter)))
            if id(layer) in graph_of:
                key = graph_of[id(layer)]
                self._graphs[key] = self._ranged(self._graphs[key], index, letter)
        self._forward: Any = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._graphs.update(self._unranged)

    def _ranged(self, graph: Any, index: int, letter: str) -> Callable:
        pre, post = self._pre(index, letter), self._post(index, letter)

        def call(hidden: Any, packed: Any, eager: Callable) -> Any:
            if graph.shape != hidden.shape:  # eager: the layer's own hooks open the ranges
                return graph(hidden, packed, eager)
            pre(None, (hidden,), {})
            out = graph(hidden, packed, eager)
            post(None, (), out)
            return out

        return call

    def _pre(self, index: int, letter: str) -> Callable:
        import torch

        def hook(_module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda _g: self._close_backward(index))
            self._forward = torch.profiler.record_function(f"{RANGE_PREFIX}fwd {letter}")
            self._forward.__enter__()

        return hook

    def _post(self, index: int, letter: str) -> Callable:
        import torch

        def hook(_module: Any, _args: tuple, output: Any) -> None:
            self._forward.__exit__(None, None, None)
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda _g: self._open_backward(index, letter))

        return hook

    def _open_backward(self, index: int, letter: str) -> None:
        import torch

        if not self._closer_queued:  # close whatever is open when this backward pass ends
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._closer_queued = True
        self._close_backward(None)
        rf = torch.profiler.record_function(f"{RANGE_PREFIX}bwd {letter}")
        rf.__enter__()
        self._open = (index, rf)

    def _close_backward(self, index: int | None) -> None:
        if self._open is not None and (index is None or self._open[0] == index):
            self._open[1].__exit__(None, None, None)
            self._open = None

    def _end_backward(self) -> None:
        self._close_backward(None)
        self._closer_queued = False


def _add_kernels(event: Any, into: dict[str, float]) -> None:
    """Add the kernels ``event`` and its descendants launched (a range's, kernels of graph replays
    included) into ``into``: name -> ms."""
    for kernel in event.kernels:
        into[kernel.name] += kernel.duration / 1e3
    for child in event.cpu_children:
        _add_kernels(child, into)


def profile_summary(
    report: Report,
    name: str,
    trainer: Trainer,
    layers: list[tuple[str, Any]],
    config: ModelConfig,
    layout: Layout,
    graphs: dict[int, Any],
) -> None:
    """Top kernels by GPU time, top host ops by their own CPU time, and GPU and host time per letter
    over PROFILE_STEPS steps (host times are inflated by the profiler's own recording)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from nam_spec.letters import LETTERS

    ranges = LetterRanges(layers, graphs)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _sync()
            start = time.perf_counter()
            for _ in range(PROFILE_STEPS):
                trainer.step()
            _sync()
            wall_ms = (time.perf_counter() - start) * 1e3 / PROFILE_STEPS
    finally:
        ranges.remove()
    log(f"profiled {PROFILE_STEPS} steps ({wall_ms:.0f} ms per step under the profiler); summarising")
    averages = prof.key_averages()
    kernels = [
        e
        for e in averages
        if e.device_type == DeviceType.CUDA
        and not e.key.startswith(RANGE_PREFIX)
        and not e.key.startswith("ProfilerStep")
    ]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / PROFILE_STEPS
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines = [
        f"{name}, {PROFILE_STEPS} profiled steps: wall {wall_ms:.0f} ms/step, GPU kernels busy {busy_ms:.0f} ms/step "
        f"({100 * busy_ms / wall_ms:.0f}% of wall)",
        f"{'kernel':<90} {'calls/step':>10} {'ms/step':>9} {'% step':>7}",
    ]
    for e in kernels[:TOP_KERNELS]:
        ms = e.self_device_time_total / 1e3 / PROFILE_STEPS
        calls = e.count / PROFILE_STEPS
        lines.append(f"{e.key[:90]:<90} {calls:>10.0f} {ms:>9.2f} {100 * ms / wall_ms:>7.1f}")
        report.row(f"{name} kernel {e.key[:38]}", ms=ms, calls_per_step=calls, pct_step=100 * ms / wall_ms)

    # the host's side: the ops whose own CPU time (under the profiler) is largest, with the GPU time of
    # the kernels they launched
    host_ops = [
        e
        for e in averages
        if e.device_type == DeviceType.CPU
        and not e.key.startswith(RANGE_PREFIX)
        and not e.key.startswith("ProfilerStep")
    ]
    host_ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    lines.append(f"{'host op (self CPU time)':<90} {'calls/step':>10} {'ms/step':>9} {'GPU ms':>7}")
    for e in host_ops[:TOP_KERNELS]:
        ms, gpu_ms = (t / 1e3 / PROFILE_STEPS for t in (e.self_cpu_time_total, e.device_time_total))
        calls = e.count / PROFILE_STEPS
        lines.append(f"{e.key[:90]:<90} {calls:>10.0f} {ms:>9.2f} {gpu_ms:>7.2f}")
        report.row(f"{name} host {e.key[:40]}", ms=ms, calls_per_step=calls, gpu_ms=gpu_ms)

    per_range: dict[str, float] = defaultdict(float)
    per_range_host: dict[str, float] = defaultdict(float)
    per_range_kernels: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in prof.events():
        if e.device_type == DeviceType.CPU and e.name.startswith(RANGE_PREFIX):
            per_range[e.name[len(RANGE_PREFIX) :]] += e.device_time_total / 1e3 / PROFILE_STEPS
            per_range_host[e.name[len(RANGE_PREFIX) :]] += e.cpu_time_total / 1e3 / PROFILE_STEPS
            _add_kernels(e, per_range_kernels[e.name[len(RANGE_PREFIX) :]])
    counts = layout.counts
    tokens = trainer.tokens_per_step
    lines.append(
        f"{'letter':<7} {'layers':>6} {'fwd ms/step':>11} {'bwd ms/step':>11} {'% step':>7} "
        f"{'ms/layer':>9} {'model TFLOP/s':>13} {'host fwd ms':>11} {'host bwd ms':>11}"
    )
    attributed = 0.0
    for letter in sorted({k for k, _ in layers} - {EMBEDDING}):
        fwd, bwd = per_range.get(f"fwd {letter}", 0.0), per_range.get(f"bwd {letter}", 0.0)
        host_fwd, host_bwd = (
            per_range_host.get(f"fwd {letter}", 0.0),
            per_range_host.get(f"bwd {letter}", 0.0),
        )
        attributed += fwd + bwd
        block = LETTERS[letter]
        per_token = 6.0 * block.params(config).matmul_active + block.extra_flops_per_token(config)
        total = fwd + bwd
        tflops = per_token * counts[letter] * tokens / (total * 1e-3) / 1e12 if total else float("nan")
        lines.append(
            f"{letter:<7} {counts[letter]:>6} {fwd:>11.1f} {bwd:>11.1f} {100 * total / wall_ms:>7.1f} "
            f"{total / counts[letter]:>9.2f} {tflops:>13.0f} {host_fwd:>11.1f} {host_bwd:>11.1f}"
        )
        report.row(
            f"{name} letter {letter} fwd+bwd per step",
            ms=total,
            fwd_ms=fwd,
            bwd_ms=bwd,
            model_tflops=tflops,
            host_fwd_ms=host_fwd,
            host_bwd_ms=host_bwd,
        )
    if any(k == EMBEDDING for k, _ in layers):
        fwd, bwd = per_range.get(f"fwd {EMBEDDING}", 0.0), per_range.get(f"bwd {EMBEDDING}", 0.0)
        attributed += fwd + bwd
        share = (fwd + bwd) / wall_ms
        lines.append(
            f"embedding (word, n-gram hash, structure) fwd {fwd:.1f} + bwd {bwd:.1f} ms/step of GPU kernels: "
            f"{100 * share:.1f}% of the step (goal < 3%), {100 * (fwd + bwd) / max(busy_ms, 1e-9):.1f}% of the kernel time"
        )
        report.row(f"{name} embedding fwd+bwd per step", ms=fwd + bwd, pct_step=100 * share, goal_pct=3.0)
    rest = busy_ms - attributed
    lines.append(f"rest (output+loss, DDP, optimizer, gaps in kernels outside layers): {rest:.1f} ms/step")
    lines.append(f"top {TOP_RANGE_KERNELS} kernels inside each range, ms/step:")
    for key in sorted(per_range_kernels):
        top = sorted(per_range_kernels[key].items(), key=lambda kv: -kv[1])[:TOP_RANGE_KERNELS]
        lines.append(f"  {key}: " + "; ".join(f"{n[:60]} {ms / PROFILE_STEPS:.2f}" for n, ms in top))
    lines.append(
        "(letter times are GPU kernel time launched inside the ranges; 0 means the profiler linked none)"
    )
    for line in lines:
        print(line, flush=True)
    out = Path(os.environ.get("OUT", "bench/out"))
    out.mkdir(parents=True, exist_ok=True)
    table = averages.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=100)
    path = out / f"trainer_profile_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.txt"  # a plain file name
    path.write_text("\n".join(lines) + "\n\n" + table + "\n")
    log(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------


def expected_initial_loss(config: Any) -> float:
    """Cross-entropy of N(0, s^2) logits over V classes, s^2 = init_std^2 x hidden (the output
    layer on unit-RMS normed states): ln V + s^2 / 2."""
    return math.log(config.vocab_size) + config.init_std**2 * config.hidden_size / 2


def _parameters(model: Any) -> tuple[int, dict[str, int]]:
    by_dtype: dict[str, int] = defaultdict(int)
    for p in model.parameters():
        by_dtype[str(p.dtype).removeprefix("torch.")] += p.numel()
    return sum(by_dtype.values()), dict(by_dtype)


def estimated_peak_gib(config: ModelConfig, layout: Layout, micro_batch: int) -> float:
    """nam_spec.memory's per-GPU peak for our model at this micro-batch (one rank, distributed optimizer)."""
    from nam_spec.memory import memory_estimate

    return memory_estimate(config, layout, micro_batch_size=micro_batch).total_gib


def run_model(
    report: Report,
    name: str,
    run: Any,
    layout: Any,
    batches: list[dict],
    *,
    formula_params: int,
    params_tol: float,
    layers: list[tuple[str, Any]] | None = None,
    graphs: dict[int, Any] | None = None,
    estimate_gib: float | None = None,
) -> dict[str, Any]:
    """Checks, timed steps and one result row for a model set up by the trainer (``run``); profiles
    it when given its layers; checks the measured peak against ``estimate_gib`` (nam_spec.memory)
    when given."""
    import torch

    from nam_spec.accounting import model_flops_per_token

    config = run.model
    total, by_dtype = _parameters(run.chunks[0].module)
    log(f"{name}: {total / 1e9:.3f} B parameters {by_dtype}; accounting formula {formula_params / 1e9:.3f} B")
    report.check(
        f"{name}: built params vs accounting formula",
        abs(total - formula_params) / formula_params,
        params_tol,
    )
    trainer = Trainer(run, batches, config.seq_length)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    steps = WARMUP_STEPS + TIMED_STEPS
    losses, times = train(name, trainer, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else math.nan
    # what the caching allocator holds, the CUDA graphs' pool whole (its freed blocks stay reserved
    # for the replays): what an out-of-memory error is about
    reserved = torch.cuda.max_memory_reserved() / 2**30 if on_gpu else math.nan
    est = math.nan if estimate_gib is None else estimate_gib
    if estimate_gib is not None:
        report.check(
            f"{name} micro-batch {batches[0]['input_ids'].shape[0]}: |est - measured| / measured peak",
            abs(est - peak) / peak,
            0.15,
        )
    expected = expected_initial_loss(config)
    report.check(
        f"{name}: initial loss - (ln V + std^2 h / 2 = {expected:.2f})", abs(losses[0] - expected), 0.5
    )
    report.check(
        f"{name}: all {steps} losses finite", 0.0 if all(map(math.isfinite, losses)) else math.inf, 0.0
    )
    ms = statistics.median(times[WARMUP_STEPS:])
    tokens = trainer.tokens_per_step
    flops = model_flops_per_token(config, layout) * tokens
    result = {
        "tokens/s": tokens / (ms * 1e-3),
        "model TFLOP/s": flops / (ms * 1e-3) / 1e12,
        "ms": ms,
        "peak GiB": peak,
        "reserved GiB": reserved,
        "losses": losses,
        "first gradients": trainer.first_gradients,
    }
    result["MFU 989"] = result["model TFLOP/s"] / DENSE_BF16_TFLOPS
    result["MFU 700"] = result["model TFLOP/s"] / MATMUL_TFLOPS
    report.row(
        f"{name} step {len(batches)}x{batches[0]['input_ids'].shape[0]}x{config.seq_length} bf16",
        ms=ms,
        floor_ms=flops / (MATMUL_TFLOPS * 1e12) * 1e3,
        peak_gib=peak,
        reserved_gib=reserved,
        est_gib=est,
        tokens_per_s=result["tokens/s"],
        model_tflops=result["model TFLOP/s"],
        mfu_989=result["MFU 989"],
        mfu_700=result["MFU 700"],
        params_b=total / 1e9,
    )
    log(
        f"{name}: median step {ms:.0f} ms over {TIMED_STEPS} (after {WARMUP_STEPS} warm-up), "
        f"{result['tokens/s']:,.0f} tokens/s, {result['model TFLOP/s']:.0f} model TFLOP/s, "
        f"MFU {100 * result['MFU 989']:.1f}% of 989 / {100 * result['MFU 700']:.1f}% of 700, peak {peak:.1f} GiB "
        f"(est GiB {est:.1f})"
    )
    if layers is not None:
        try:
            profile_summary(report, name, trainer, layers, config, layout, graphs or {})
        except Exception:  # the profile is extra information: keep the baseline's numbers coming
            report.fail("trainer profile", traceback.format_exc())
            log("profile failed (traceback in the table); continuing")
    return result


def main(report: Report) -> None:
    import torch

    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    if unknown := set(CHOSEN_LEVERS) - set(LEVERS):
        raise ValueError(f"NAM_TRAINER_LEVERS: no lever {sorted(unknown)}; the levers are {list(LEVERS)}")
    checked = preset()
    c = checked.config.model
    layout = c.layout()
    log(
        f"{PRESET}: {layout.pattern} x {layout.depth}, hidden {c.hidden_size}, vocab {c.vocab_size}, "
        f"seq {c.seq_length}; micro-batch {MICRO_BATCH} x {MICROBATCHES} micro-batches = "
        f"{MICRO_BATCH * MICROBATCHES * c.seq_length} tokens per step; lr {checked.config.training.lr}"
    )
    log("model FLOPs, ours (DESIGN.md; nam_spec.accounting.model_flops_per_token):")
    for line in flop_lines(c, layout):
        print("    " + line, flush=True)

    ours = in_fresh_process(report, ours_case, MICRO_BATCH, {}, "profile" in CASES)
    if ours is None:
        raise RuntimeError("ours at micro-batch 1 failed (its traceback is in the table)")

    graphed = _lever(report, ours, "graphs", profile=True) if "graphs" in CASES else None

    if "megatron" in CASES and gib < MEGATRON_GIB:
        log(f"megatron-core's model needs ~{MEGATRON_GIB} GiB at micro-batch 1: not run on {gib:.0f} GiB")
    elif "megatron" in CASES and (theirs := in_fresh_process(report, megatron_case)) is not None:
        ratio = ours["tokens/s"] / theirs["tokens/s"]
        report.row("ours / megatron tokens/s (goal >= 6)", ours_tflops=ours["model TFLOP/s"], ratio=ratio)
        log(
            f"ours / megatron-core tokens/s = {ratio:.2f} (goal >= 6); ours {ours['model TFLOP/s']:.0f} "
            f"model TFLOP/s at micro-batch 1 (goal 250)"
        )

    # ours at larger micro-batches, same tokens per step (graphed where graphs ran): what per-launch
    # overhead and the batch-bound scans (M2RNN's 4096-step chain costs the same at any batch) cost
    # at micro-batch 1
    for micro_batch in LARGER_MICRO_BATCHES if "larger" in CASES else ():
        estimate = estimated_peak_gib(c, layout, micro_batch)
        if estimate > gib:
            log(f"ours at micro-batch {micro_batch}: estimate {estimate:.1f} GiB > {gib:.0f} GiB, not run")
            continue
        in_fresh_process(report, ours_case, micro_batch, GRAPHED if graphed else {}, False)

    ran = {"graphs": graphed}
    for name in LEVERS if "levers" in CASES else ():
        if name != "graphs" and name in CHOSEN_LEVERS:
            ran[name] = _lever(report, ours, name, profile=False)
    for name, twin in EAGER_TWINS.items():
        if ran.get(name) is not None and ran.get(twin) is not None:
            _follows(report, f"lever {name}", ran[name], f"its eager twin ({twin})", ran[twin])


def _lever(report: Report, ours: dict[str, Any], name: str, profile: bool) -> dict[str, Any] | None:
    """Ours at micro-batch 1 with LEVERS[name] set: its step-time ratio to ours as configured and
    the checks that it follows ours; None where it failed (its traceback is in the table)."""
    lever = in_fresh_process(report, ours_case, MICRO_BATCH, LEVERS[name], profile)
    if lever is None:
        return None
    report.row(f"lever {name}: step time / ours as configured", ratio=lever["ms"] / ours["ms"])
    _follows(report, f"lever {name}", lever, "ours", ours)
    log(f"lever {name}: step {lever['ms']:.0f} / {ours['ms']:.0f} ms")
    return lever


def _follows(
    report: Report, name: str, run: dict[str, Any], baseline_name: str, baseline: dict[str, Any]
) -> None:
    """The checks that ``run`` computes what ``baseline`` does: the losses of every step (relative,
    LEVER_LOSS_TOL) and the step-0 gradient of every parameter (GRAD_TOL; router weights
    ROUTER_GRAD_TOL)."""
    drifts = [abs(a - b) / abs(b) for a, b in zip(run["losses"], baseline["losses"], strict=True)]
    # max() keeps its first value against a NaN (every comparison with NaN is false): a run whose
    # losses turn NaN must fail, not pass on the steps before
    drift = max(drifts) if all(map(math.isfinite, drifts)) else math.inf
    report.check(f"{name}: losses of every step vs {baseline_name} (relative)", drift, LEVER_LOSS_TOL)
    for routers, what, tol in (
        (False, "every parameter but the routers", GRAD_TOL),
        (True, "every router weight", ROUTER_GRAD_TOL),
    ):
        error, where = gradient_difference(run["first gradients"], baseline["first gradients"], routers)
        report.check(f"{name}: step-0 gradient of {what} vs {baseline_name} (worst: {where})", error, tol)
        log(f"{name}: step-0 gradient of {what} within {error:.2e} of {baseline_name} (worst {where})")
    log(f"{name}: losses within {drift:.2e} of {baseline_name}")


def ours_case(
    report: Report, world: Any, micro_batch: int, overrides: dict[str, str], profile: bool
) -> dict[str, Any]:
    """Ours at ``micro_batch`` (MICROBATCHES * MICRO_BATCH rows per step) with ``overrides``
    ("section.key": value) set; profiled when ``profile``. Returns run_model's result."""
    from nam_spec.accounting import model_params
    from nam_trainer.train.setup import build_run

    checked = preset(overrides=overrides)
    name = "ours" + "".join(f", {key} {value}" for key, value in overrides.items())
    log(f"building {name} on the GPU (micro-batch {micro_batch})")
    run = build_run(checked, world)
    c, layout = run.model, run.layout
    decoder = run.chunks[0].module.decoder
    result = run_model(
        report,
        name,
        run,
        layout,
        make_batches(c, micro_batch, MICRO_BATCH * MICROBATCHES // micro_batch, with_extras=True),
        formula_params=model_params(c, layout).total,
        params_tol=0.0,
        layers=[(EMBEDDING, run.chunks[0].module.embedding), *zip(decoder.kinds, decoder.layers, strict=True)]
        if profile
        else None,
        graphs=decoder.graphs,
        estimate_gib=estimated_peak_gib(c, layout, micro_batch),
    )
    if not overrides and micro_batch == MICRO_BATCH:
        drop = result["losses"][DROP_AFTER] / result["losses"][0]
        lr = checked.config.training.lr
        report.check(f"ours: loss after {DROP_AFTER} steps / initial, fixed batch, lr {lr}", drop, 0.995)
    return result


def megatron_case(report: Report, world: Any) -> dict[str, Any]:
    """megatron-core's HybridModel at micro-batch 1, on the trainer's DDP and optimizer."""
    from nam_spec import EmbeddingConfig
    from nam_spec.accounting import model_params
    from nam_trainer.train.setup import build_run

    checked = preset()
    c = checked.config.model
    layout = megatron_layout(c.layout())
    log(f"megatron-core HybridModel, pattern {layout.kinds} (R as M); model FLOPs:")
    for line in flop_lines(c, layout):
        print("    " + line, flush=True)
    run = build_run(checked, world, build=build_megatron)
    return run_model(
        report,
        "megatron",
        run,
        layout,
        make_batches(c, MICRO_BATCH, MICROBATCHES, with_extras=False),
        formula_params=model_params(c.replace(embedding=EmbeddingConfig()), layout).total,  # no extras
        params_tol=1e-2,
    )

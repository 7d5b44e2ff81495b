"""CUDA graphs per layer (``ModelConfig.cuda_graphs``): a layer's training forward and backward
captured once and replayed for every later micro-batch of the same shape.

Why: at micro-batch 1 the step is bound by the host's launches, not by the GPU. One layer at the
training shape of nam56r-small (seq 4096, b 1) on an H200, eager against graphed forward+backward
(bench/layer_graphs.py, bench/RESULTS.md): M 9.38 -> 1.98 ms, E (local dispatcher) 7.42 -> 1.92 ms,
R 7.36 -> 4.73 ms.

How a layer is captured: its first WARMUP_CALLS training calls run eagerly with the inputs the
capture will have (M and R read segment ids, all zeros without boundaries). They do the Triton
autotuning of the very kernels the capture records (an autotuning inside a capture synchronises,
which the capture forbids) and make megatron's lazily created MoE state (tracker entries, the
aux-loss scale) for real; being the micro-batches' own calls, they pollute no gradient or counter.
The next call captures the forward and replays it; the backward is captured when that micro-batch's
backward first reaches the layer, then replayed. Every later call copies the hidden states (and,
for M and R, the micro-batch's segment ids) into the graph's static inputs; the capturing call's
are made from its own inputs, since a copy into them before the backward capture would be an
in-place write to tensors the forward saved, which autograd refuses.

All graphed layers of a model capture into one memory pool (with a pool per layer, micro-batch 1 on
the H100 reserved 60.3 GiB against an allocated peak of 41.6, and micro-batch 2 ran out of memory;
with one pool: 50.1 GiB, and micro-batch 2 runs). That is safe only because the captures run in
the order the graphs replay: every layer captures in the same micro-batch, the forwards in layer
order, the backwards in reverse as the backward reaches them. A capture may reuse a block that an earlier capture freed (layer k's saved
activations, freed by its backward capture) because it also replays after that earlier graph;
replayed in another order, a graph would overwrite activations still to be read. Interleaved
micro-batches (pipeline parallelism > 1) would be such an order: nam_spec.validation refuses them.

What stays right under replay: weights are updated in place by the optimizer (same storage);
every weight under DDP has its gradient added to ``main_grad`` inside the graph (megatron's fused
weight-gradient accumulation for its linears, an add for the others) and gets none back, so no
gradient leaves the graph's static memory for DDP's hook (bench/RESULTS.md: handed out, the first
E layer's expert gradient turned NaN on the H100); weights without DDP get theirs back; MoE counters (the
expert-bias token counts, megatron's aux-loss tracker, nam_spec.moe_metrics) add in place, so the
replay adds into the same tensors. Eval (no gradients) and another shape run eagerly. Layers
capture on the caller's current stream, which must be a stream of its own (the trainer sets one
before DDP wraps the model, so DDP's gradient accumulators live there too): the legacy default
stream cannot capture.

Which letters capture, and what they need, each letter says (``Letter.graphable``,
``reads_segments``, ``graph_problems``): M, R and E. A does not (its backward capture failed in
bench/layer_graphs.py, and eager it is GPU-bound already). E needs ``moe.dispatcher = "local"``
(megatron's alltoall reads token counts back to the host, which a capture forbids). Graphs need
one pipeline stage and no tensor parallelism (several micro-batches in flight would overwrite a
layer's static activations; collectives are not captured here) and no full recomputation of a
graphed letter (nam_spec.validation says so before anything is built).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from nam_spec.documents import segment_ids
from nam_spec.letters import LETTERS

WARMUP_CALLS = 2  # eager training calls of a layer before its capture: one runs every autotuning


class GraphPool:
    """The memory pool that all graphed layers of one model capture into; its handle is made at the
    first capture, so that building a model (without CUDA, or without capturing) calls no CUDA."""

    def __init__(self) -> None:
        self._handle: tuple[int, int] | None = None

    def handle(self) -> tuple[int, int]:
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle


class LayerGraph:
    """One layer's training call: eager for the first WARMUP_CALLS, then captured and replayed."""

    def __init__(self, layer: torch.nn.Module, segments: bool, pool: GraphPool) -> None:
        self.layer = layer
        self.segments = segments
        self.pool = pool
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.eager_calls = 0
        self.shape: torch.Size | None = None  # of the hidden states captured; None until captured
        self.backward_graph: torch.cuda.CUDAGraph | None = None  # captured by the first backward

    def __call__(
        self, hidden: torch.Tensor, packed: PackedSeqParams | None, eager: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        if self.shape is None:
            if self.eager_calls < WARMUP_CALLS:
                # the capture's own inputs (segment ids even without boundaries), so that the
                # kernels it runs are the ones compiled and autotuned here: an autotuning inside a
                # capture synchronises, which the capture forbids
                self.eager_calls += 1
                return self._run(hidden, self._segments(hidden, packed))
            # static inputs made from this call's own, not copied into (see the module's docstring)
            self._capture(hidden, self._segments(hidden, packed))
        elif hidden.shape != self.shape or hidden.dtype != self.static_in.dtype:
            return eager()
        else:
            with torch.no_grad():  # a leaf that requires grad
                self.static_in.copy_(hidden)
            if self.segments and packed is None:
                self.static_segments.zero_()  # one segment per row, without a fresh tensor to copy from
            elif self.segments:
                self.static_segments.copy_(self._segments(hidden, packed))
        return _Replay.apply(self, hidden, *self.params)

    def _segments(self, hidden: torch.Tensor, packed: PackedSeqParams | None) -> torch.Tensor | None:
        """The segment ids [b, s] this layer reads (all zeros, one segment per row, without
        boundaries: the same as none); None for a layer that reads none."""
        if not self.segments:
            return None
        s, b = hidden.shape[:2]
        if packed is None:
            return torch.zeros(b, s, dtype=torch.int32, device=hidden.device)
        return segment_ids(packed, b, s, hidden.device)

    def _run(self, hidden: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        """The layer on ``hidden`` with ``segments`` as its only boundaries (TransformerLayer returns
        a tuple, the mixer layers a tensor)."""
        out = self.layer(
            hidden, packed_seq_params=None if segments is None else PackedSeqParams(seq_idx=segments)
        )
        return out[0] if isinstance(out, tuple) else out

    def _capture(self, hidden: torch.Tensor, segments: torch.Tensor | None) -> None:
        self.static_in = hidden.detach().clone().requires_grad_(True)
        # a copy: segment_ids hands the same tensor to every layer of the micro-batch
        self.static_segments = None if segments is None else segments.clone()
        # on the training stream itself, where the weights' gradient accumulators live: captured on a
        # side stream, the backward syncs every weight's gradient across streams
        self.stream = torch.cuda.current_stream()
        if self.stream == torch.cuda.default_stream():
            raise RuntimeError(
                "nam_spec.graphs: layers capture on the current stream, and the legacy default stream "
                "cannot capture; train on a stream of your own (torch.cuda.set_stream(torch.cuda.Stream()))"
            )
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=self.pool.handle(), stream=self.stream):
            self.static_out = self._run(self.static_in, self.static_segments)
        # outside the pool: written before each backward replay, it must share no block with a graph
        self.static_grad_out = torch.empty_like(self.static_out)
        self.shape = hidden.shape

    def _capture_backward(self) -> torch.cuda.CUDAGraph:
        """The backward graph, captured when the first backward reaches this layer (so that the
        model's captures run in the order of its replays, see the module's docstring)."""
        for p in self.params:  # megatron's linears set it when they accumulate into main_grad
            if hasattr(p, "grad_added_to_main_grad"):
                p.grad_added_to_main_grad = False
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool.handle(), stream=self.stream):
            grads = torch.autograd.grad(
                self.static_out, (self.static_in, *self.params), self.static_grad_out, allow_unused=True
            )
            self.static_grads = _into_main_grad(self.params, list(grads[1:]))
        self.static_grad_in = grads[0]
        return graph


def _into_main_grad(
    params: list[torch.Tensor], grads: list[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """The gradients a replay returns to autograd: a weight with DDP's ``main_grad`` gets its
    gradient added there (inside the capture, so every replay adds it) and returns none; megatron's
    fused accumulation has added some already (``grad_added_to_main_grad``; their gradient is an
    uninitialised placeholder). Only weights without ``main_grad`` (no DDP) return theirs: a
    gradient handed out of the graph lives in its static memory, which the layer's next replay
    overwrites, however late another stream's hook reads it."""
    out: list[torch.Tensor | None] = []
    for p, g in zip(params, grads, strict=True):
        if g is not None and hasattr(p, "main_grad"):
            if not getattr(p, "grad_added_to_main_grad", False):
                p.main_grad.add_(g)
            g = None
        out.append(g)
    return out


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, graph: LayerGraph, hidden: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        graph.forward_graph.replay()  # hidden is in static_in already; an input here for its gradient
        ctx.graph = graph
        return graph.static_out.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        graph: LayerGraph = ctx.graph
        graph.static_grad_out.copy_(grad_out)
        if graph.backward_graph is None:  # a capture runs nothing: replayed right after, as forward's
            graph.backward_graph = graph._capture_backward()
        graph.backward_graph.replay()
        return (
            None,
            graph.static_grad_in.detach(),
            *(None if g is None else g.detach() for g in graph.static_grads),
        )


def graphs_unavailable(letters: str) -> str | None:
    """Why ``model.cuda_graphs = letters`` cannot run here, or None when it can."""
    if letters and not torch.cuda.is_available():
        return f"model.cuda_graphs = {letters!r} needs a CUDA device; set it to '' here"
    return None


def layer_graphs(kinds: str, layers: torch.nn.ModuleList, letters: str) -> dict[int, LayerGraph]:
    """Index in the stack -> LayerGraph, for the layers whose letter is in ``letters``, all capturing
    into one pool."""
    pool = GraphPool()
    return {
        i: LayerGraph(layer, segments=LETTERS[letter].reads_segments, pool=pool)
        for i, (letter, layer) in enumerate(zip(kinds, layers, strict=True))
        if letter in letters
    }

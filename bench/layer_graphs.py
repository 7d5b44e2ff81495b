"""What CUDA graphs take out of each layer: one layer per letter of nam56r-small, forward and
backward at the training shape, eager against nam_spec.graphs' LayerGraph (what
``model.cuda_graphs`` runs in training).

    NAM_COMMIT=<sha> bash bench/gpu.sh layer_graphs

Why: at micro-batch 1 the step is host-bound (bench/RESULTS.md, "What stands between this step
and the goals": mamba-ssm's Python around its kernels alone costs M ~8 ms of host per layer and
micro-batch against 2 ms of kernels). A captured graph replays all of a layer's kernels in one
launch per pass.

Layers: bench/host_ops.py's ``build`` (the trainer's preset, bf16, local backend, no recomputation),
one of each of A, M, R and E (with the local dispatcher, whose capture megatron's alltoall
forbids by reading token counts back to the host), on CUDA without DDP (weights keep plain
``.grad``; the trainer's DDP path is bench/trainer.py's "graphs" lever), input [SEQ, BATCH,
hidden] with the model's RoPE and no document boundaries (the graphed M and R read all-zero
segment ids, which is the same). Eager: REPEATS forward+backward calls back to back, synchronised
once, wall time per call, and the host's issue time per call (until backward() returns,
unsynchronised). Graphed: the layer's LayerGraph (in a pool of its own) after its eager warm-up
calls and its captures (the forward in the call, the backward when backward() reaches it), the
same calls. A is timed eagerly only (not in GRAPH_LETTERS: its backward breaks a capture).
Checks first: the graphed layer's output, input gradient and every parameter gradient against
eager on the same input (bf16; relative to the eager tensor's max |value|). Rows: eager and
graphed ms per call, their ratio, eager host ms, and the memory the captures hold (the layer's
pool).
"""

from __future__ import annotations

import time
import traceback
from functools import partial
from typing import Any

from bench.report import Report
from bench.world import one_rank_world

SEQ, BATCH = 4096, 1
REPEATS = 20
TOL = 2e-2  # bf16: a graph replays the same kernels, so only nondeterministic reductions differ


def _layers(device: Any) -> tuple[dict[str, Any], Any]:
    """letter -> layer (E from a build with the local dispatcher), and the model's RoPE at SEQ."""
    from bench.host_ops import build

    net, _ = build(device, "AMR", ddp=False)
    local, _ = build(device, "E", ddp=False, **{"moe.dispatcher": "local"})
    layers = dict(zip(net.decoder.kinds, net.decoder.layers, strict=True))
    layers["E"] = local.decoder.layers[0]
    return layers, net.rotary_pos_emb(SEQ)


def _eager(layer: Any, rope: Any) -> Any:
    """x -> layer(x) with the model's RoPE, no mask and no boundaries."""

    def call(x: Any) -> Any:
        out = layer(x, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=None)
        return out[0] if isinstance(out, tuple) else out

    return call


def _step(fn: Any, x: Any, dy: Any) -> tuple[Any, Any]:
    x = x.detach().requires_grad_(True)
    out = fn(x)
    out.backward(dy)
    return out, x.grad


def _grads(layer: Any) -> dict[str, Any]:
    return {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}


def _time(fn: Any, x: Any, dy: Any) -> tuple[float, float]:
    """(wall ms per call over REPEATS back-to-back calls, median host issue ms per call)."""
    import torch

    torch.cuda.synchronize()
    issue = []
    start = time.perf_counter()
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        _step(fn, x, dy)
        issue.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / REPEATS
    return wall * 1e3, sorted(issue)[len(issue) // 2] * 1e3


def main(report: Report) -> None:
    import torch

    # graphs capture on the current stream, which the legacy default stream cannot be (the trainer
    # trains on a stream of its own too)
    with one_rank_world(), torch.cuda.stream(torch.cuda.Stream()):
        _bench(report)


def _bench(report: Report) -> None:
    import torch

    from nam_spec.graphs import WARMUP_CALLS, GraphPool, LayerGraph
    from nam_spec.letters import GRAPH_LETTERS, LETTERS

    device = torch.device("cuda", torch.cuda.current_device())
    layers, rope = _layers(device)
    hidden = next(iter(layers.values())).config.hidden_size
    dtype = next(iter(layers.values())).config.params_dtype
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(SEQ, BATCH, hidden, device=device, dtype=dtype, generator=gen)
    dy = torch.randn(SEQ, BATCH, hidden, device=device, dtype=dtype, generator=gen)
    for letter, layer in layers.items():
        call = _eager(layer, rope)
        _step(call, x, dy)  # compile and autotune outside the timing
        layer.zero_grad(set_to_none=True)
        out_e, dx_e = _step(call, x, dy)
        grads_e = _grads(layer)
        eager_ms, host_ms = _time(call, x, dy)
        if letter not in GRAPH_LETTERS:
            report.row(
                f"{letter} fwd+bwd s{SEQ} b{BATCH}", ms=eager_ms, host_ms=host_ms, graphed="not capturable"
            )
            continue
        graph = LayerGraph(layer, segments=LETTERS[letter].reads_segments, pool=GraphPool())

        def graphed(x: Any, graph: Any = graph, call: Any = call) -> Any:
            return graph(x, None, partial(call, x))

        for _ in range(WARMUP_CALLS):  # the graph's own eager calls
            _step(graphed, x, dy)
        before = torch.cuda.memory_allocated()
        try:
            _step(graphed, x, dy)  # captures the forward, then the backward in backward(); each replays
        except Exception:
            report.fail(report.bench, f"{letter}: capture failed\n{traceback.format_exc()}")
            report.row(
                f"{letter} fwd+bwd s{SEQ} b{BATCH}", ms=eager_ms, host_ms=host_ms, graphed="capture failed"
            )
            continue
        pool_gib = (torch.cuda.memory_allocated() - before) / 2**30
        layer.zero_grad(set_to_none=True)
        out_g, dx_g = _step(graphed, x, dy)
        grads_g = _grads(layer)
        for name, a, b in [("output", out_g, out_e), ("input grad", dx_g, dx_e)] + [
            (f"grad {n}", grads_g.get(n), g) for n, g in grads_e.items()
        ]:
            err = (
                float("inf")
                if a is None
                else float((a.float() - b.float()).abs().max() / b.float().abs().max())
            )
            report.check(f"{letter} graphed vs eager: {name}", err, TOL)
        graphed_ms, _ = _time(graphed, x, dy)
        report.row(
            f"{letter} fwd+bwd s{SEQ} b{BATCH}",
            ms=graphed_ms,
            eager_ms=eager_ms,
            eager_host_ms=host_ms,
            eager_over_graphed=eager_ms / graphed_ms,
            pool_gib=pool_gib,
        )

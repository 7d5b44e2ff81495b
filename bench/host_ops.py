"""Host cost per letter of nam56r-small: the aten ops one forward+backward of one layer dispatches,
by kind, and the host time of that forward+backward at a tiny shape.

    python bench/run.py host_ops            # on CPU (here)
    bash bench/gpu.sh host_ops              # on the GPU machine

Why: at micro-batch 1 the trainer's step is host-bound (the GPU is busy about half of the step),
so the number of ops per layer, not their FLOPs, sets the step time there. Every aten op is a
dispatcher trip and Python around it and, on CUDA, mostly a kernel launch.

Model: the trainer's nam56r-small preset as bench/trainer.py's ``preset()`` checks it (bf16
parameters, local backend, no recomputation, gradient accumulation fusion on, megatron's alltoall
dispatcher), built by ``nam_spec.build_model`` on the four-layer layout AEMR (one layer of each
letter at the preset's geometry, beside the embedding and output layer), in megatron's DDP as
nam-train's ``build_run`` wraps it (fp32 main gradients, distributed optimizer): the linears
accumulate their weight gradients into ``main_grad`` and every other gradient goes through DDP's
hook, as in training.

Rows. ``A``, ``E``, ``M``, ``R``: one layer, input [SEQ, BATCH, hidden] requiring grad, the
model's RoPE, no document boundaries, output backward with a fixed random gradient. ``E local``:
the E layer of a second model built with the lever ``moe.dispatcher = local`` (nam-spec's
dispatcher in place of megatron's alltoall one). ``embed``: the HybridEmbedding with its n-gram
hash and structure extras (the trainer's random structure channels). ``output``: final norm,
output layer and per-token loss (``NamModel._token_losses``) with the trainer's mean.
``stack docs``: the four layers and final norm through the NamStack with document boundaries
(DOCUMENTS documents per row; ``nam_spec.documents.document_boundaries`` made afresh each step, as
the trainer does per micro-batch), where what the layers derive from the boundaries shows.

Columns: ``ops``, every aten op a TorchDispatchMode sees (composite ops arrive decomposed, as their
kernels run); of them ``views`` (aliasing outputs, no kernel), ``copies`` (copy_, _to_copy, clone:
.to(), .float(), .contiguous() and the reshape of a non-viewable tensor arrive as these), ``cats``
(cat, stack), ``syncs`` (_local_scalar_dense, nonzero and device-to-host copies: the host waits
for the device), and the most frequent op names. Some things are one kernel on CUDA and several
ops on CPU, so a CPU count is higher there: ``F.rms_norm`` (RMSNorm, about 9 ops forward and 20
backward on CPU; aten's fused kernel on CUDA), ``nam_runtime.wgrad``'s bf16-to-fp32 casts before
the weight-gradient GEMM (two copies per megatron linear; addmm with out_dtype on CUDA) and, in
``stack docs``, the M2RNN convolutions with document boundaries (torch's per-tap loop on CPU,
causal-conv1d's kernel on CUDA). On CUDA, megatron's alltoall dispatcher's waits show as
device-to-host copies in ``syncs``.

The custom-kernel parts (M: the Mamba core, the fused CUDA / Triton path on the GPU; R: the M2RNN
scan, Triton on the GPU) run on CPU on the reference path, a per-chunk / per-step PyTorch loop
whose hundreds of ops the GPU never runs. They are fenced (an autograd Function that runs them on
detached inputs and re-enters backward for their gradients; same values) and counted apart in
``kernel ops`` with their path; ``ops`` and ``host ms`` are the rest.

Host time: the median over REPEATS of one forward+backward, without the counter. On CUDA it is the
time until backward() returns, not synchronised (the host's issue time), beside the synchronised
``wall ms``. On CPU it is wall time on one thread (two threads on the 2-core machine swing 20x
with any other load) and includes all the arithmetic: at hidden 2048 in bf16 that is not
negligible even at SEQ tokens (the fp32 main-gradient passes over each layer's weights, the
output layer's GEMMs over a 65536 vocabulary), and nam_runtime's CPU device mode (a
TorchFunctionMode) adds to every torch call; compare it across commits, not across letters.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from bench.report import Report
from bench.world import one_rank_world

SEQ, BATCH = 64, 1
DOCUMENTS = 4  # per row in the ``stack docs`` row
LETTERS = "AEMR"
WARMUP, REPEATS = 3, 10
TOP = 8
COPIES = {"copy_", "_to_copy", "clone", "_copy_from", "_copy_from_and_resize", "lift_fresh_copy"}
CATS = {"cat", "stack"}
SYNCS = {"_local_scalar_dense", "nonzero"}


class OpCounter:
    """A TorchDispatchMode that counts aten ops by name; ops run inside ``fenced()`` are counted
    apart, and the host time spent there summed (the fenced parts of a layer, module docstring)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.ops: Counter[str] = Counter()
        self.views = 0
        self.d2h = 0
        self.fenced_ops = 0
        self.fenced_s = 0.0
        self._fence = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(
                self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
            ) -> Any:
                out = func(*args, **(kwargs or {}))
                counter._count(func, args, out)
                return out

        self.mode = Mode()

    def _count(self, func: Any, args: tuple, out: Any) -> None:
        import torch

        if self._fence:
            self.fenced_ops += 1
            return
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            self.views += 1
        if name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            source = args[1] if name == "copy_" else args[0]
            self.d2h += isinstance(source, torch.Tensor) and source.device.type != "cpu"

    @contextmanager
    def fenced(self) -> Iterator[None]:
        self._fence += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.fenced_s += time.perf_counter() - start
            self._fence -= 1

    def reset(self) -> None:
        self.ops.clear()
        self.views = self.d2h = self.fenced_ops = 0
        self.fenced_s = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "ops": sum(self.ops.values()),
            "views": self.views,
            "copies": sum(n for k, n in self.ops.items() if k in COPIES),
            "cats": sum(n for k, n in self.ops.items() if k in CATS),
            "syncs": sum(n for k, n in self.ops.items() if k in SYNCS) + self.d2h,
            "kernel_ops": self.fenced_ops,
            "top": " ".join(f"{k}:{n}" for k, n in self.ops.most_common(TOP)),
        }


def _fence(counter: OpCounter, run: Callable[..., Any]) -> Callable[..., Any]:
    """``run(*inputs)`` (returning a tensor or a tuple of them) behind an autograd Function whose
    forward and backward run inside ``counter.fenced()``: the same values and gradients."""
    import torch

    class Fenced(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: Any) -> Any:
            ctx.set_materialize_grads(False)  # an unused output (the scan's final state) stays None
            with counter.fenced():
                leaves = [
                    t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                    for t in inputs
                ]
                with torch.enable_grad():
                    out = run(*leaves)
                outs = out if isinstance(out, tuple) else (out,)
                ctx.leaves, ctx.outs = leaves, outs
                result = tuple(o.detach() for o in outs)
            return result if isinstance(out, tuple) else result[0]

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            with counter.fenced():
                pairs = [
                    (o, g) for o, g in zip(ctx.outs, grads, strict=True) if g is not None and o.requires_grad
                ]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
                out = tuple(
                    t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in ctx.leaves
                )
                ctx.leaves = ctx.outs = None
            return out

    return lambda *args: Fenced.apply(*args)


@contextmanager
def _fenced_mamba(counter: OpCounter, layer: Any) -> Iterator[str]:
    """The Mamba core's path (CORES[path]) fenced; yields its description."""
    from dataclasses import fields

    from nam_mixers.ops.ssd import CORES, SSDWeights

    path = layer.mixer.core.resolved_path
    run = CORES[path]

    def run_core(zxbcdt: Any, seq_idx: Any, shape: Any, *weights: Any) -> Any:
        return run(zxbcdt, SSDWeights(*weights), shape, seq_idx)

    fenced = _fence(counter, run_core)
    CORES[path] = lambda zxbcdt, w, shape, seq_idx: fenced(
        zxbcdt, seq_idx, shape, *(getattr(w, f.name) for f in fields(w))
    )
    try:
        yield f"mamba core {path}"
    finally:
        CORES[path] = run


@contextmanager
def _fenced_m2rnn(counter: OpCounter, layer: Any) -> Iterator[str]:
    """The M2RNN scan (m2rnn_scan as nam_mixers' module calls it) fenced; yields its description."""
    from nam_mixers.modules import m2rnn
    from nam_mixers.ops.m2rnn import resolve_path

    scan, core = m2rnn.m2rnn_scan, layer.mixer.core

    def run_scan(q: Any, k: Any, v: Any, f: Any, w: Any, seq_idx: Any, path: str, config: Any) -> Any:
        return scan(q, k, v, f, w, seq_idx=seq_idx, path=path, config=config)

    fenced = _fence(counter, run_scan)
    m2rnn.m2rnn_scan = lambda q, k, v, f, w, *, seq_idx=None, path="auto", config=None: fenced(
        q, k, v, f, w, seq_idx, path, config
    )
    try:
        yield f"m2rnn scan {resolve_path(core.path, core.W.device)}"
    finally:
        m2rnn.m2rnn_scan = scan


@contextmanager
def _fenced_kernels(layers: list[tuple[str, Any]], counter: OpCounter) -> Iterator[str | None]:
    """Fence the custom-kernel parts of these (letter, layer) pairs; yields what was fenced."""
    fences = {"M": _fenced_mamba, "R": _fenced_m2rnn}
    with ExitStack() as stack:
        done: dict[str, str] = {}
        for letter, layer in layers:
            if letter in fences and letter not in done:
                done[letter] = stack.enter_context(fences[letter](counter, layer))
        yield ", ".join(done.values()) or None


def build(device: Any, kinds: str, *, ddp: bool = True, **model: str) -> tuple[Any, Any]:
    """The preset's model (``model``: [model] keys set) on layout ``kinds``, in megatron's DDP as
    nam-train sets it up unless ``ddp`` is off (then weights keep plain ``.grad``); returns (model,
    its DDP wrapper or None)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from bench.trainer import preset
    from nam_layout import Layout
    from nam_spec import build_model

    cfg = preset(**model).config
    model_cfg = cfg.model.replace(params_dtype=cfg.model.dtype_name)
    net = build_model(Layout.tile(kinds, len(kinds)), model_cfg, cfg.parallel).to(device)
    if not ddp:
        return net, None
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.distributed_optimizer
    )
    return net, DistributedDataParallel(net.config, ddp_config, net)


def _cases(net: Any, device: Any) -> dict[str, tuple[list[tuple[str, Any]], Callable[[], Any]]]:
    """name -> (the (letter, layer) pairs it runs, one forward+backward)."""
    import torch

    from bench.trainer import make_batches
    from nam_spec.documents import document_boundaries

    config = net.model_config
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (SEQ, BATCH, config.hidden_size)
    x = torch.randn(shape, device=device, dtype=net.config.params_dtype, generator=gen)
    dy = torch.randn(shape, device=device, dtype=net.config.params_dtype, generator=gen)
    rope = net.rotary_pos_emb(SEQ)
    batch = make_batches(config.replace(seq_length=SEQ), BATCH, 1, with_extras=True)[0]
    document_ids = torch.arange(SEQ).div(SEQ // DOCUMENTS, rounding_mode="floor").expand(BATCH, SEQ)
    layers = list(zip(net.decoder.kinds, net.decoder.layers, strict=True))

    def layer_step(layer: Any) -> Callable[[], None]:
        def step() -> None:
            out = layer(
                x.detach().requires_grad_(True),
                attention_mask=None,
                rotary_pos_emb=rope,
                packed_seq_params=None,
            )
            (out[0] if isinstance(out, tuple) else out).backward(dy)

        return step

    def stack_docs_step() -> None:
        packed = document_boundaries(document_ids, device)
        net.decoder(x.detach().requires_grad_(True), None, rope, packed).backward(dy)

    def embed_step() -> None:
        net.embedding(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], structure=batch["structure"]
        ).backward(dy)

    def output_step() -> None:
        hidden = net.decoder.final_norm(x.detach().requires_grad_(True))
        net._token_losses(hidden, batch["labels"], None).float().mean().backward()

    cases = {letter: ([(letter, layer)], layer_step(layer)) for letter, layer in layers}
    cases["embed"] = ([], embed_step)
    cases["output"] = ([], output_step)
    cases["stack docs"] = (layers, stack_docs_step)
    return cases


def _host_ms(step: Callable[[], Any], counter: OpCounter, cuda: bool) -> tuple[float, float | None]:
    """Median host ms of ``step`` less its fenced part; on CUDA also the synchronised wall ms."""
    import torch

    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        for _ in range(WARMUP):
            step()
        host, wall = [], []
        for _ in range(REPEATS):
            if cuda:
                torch.cuda.synchronize()
            counter.fenced_s = 0.0
            start = time.perf_counter()
            step()
            issued = time.perf_counter()
            if cuda:
                torch.cuda.synchronize()
            host.append((issued - start - counter.fenced_s) * 1e3)
            wall.append((time.perf_counter() - start - counter.fenced_s) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(host), statistics.median(wall) if cuda else None


def main(report: Report) -> None:
    with one_rank_world():
        _bench(report)


def _bench(report: Report) -> None:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    net, ddp = build(device, LETTERS)
    cases = _cases(net, device)
    local, local_ddp = build(device, "E", **{"moe.dispatcher": "local"})
    cases["E local"] = _cases(local, device)["E"]
    owner = {"E local": local_ddp}
    counter = OpCounter()
    lines = [
        f"host_ops: nam56r-small, fwd+bwd, seq {SEQ} batch {BATCH}, {net.config.params_dtype}, {device.type}",
        f"{'row':<10} {'ops':>5} {'views':>5} {'copies':>6} {'cats':>4} {'syncs':>5} {'host ms':>8} "
        f"{'wall ms':>8} {'kernel ops':>10}  top ops (fenced kernel part)",
    ]
    for name, (layers, step) in cases.items():
        owner.get(name, ddp).zero_grad_buffer()
        with _fenced_kernels(layers, counter) as fenced:
            step()  # lazy initialisation stays out of the counts
            counter.reset()
            with counter.mode:
                step()
            counts = counter.summary()
            host, wall = _host_ms(step, counter, cuda)
        report.row(f"{name} fwd+bwd s{SEQ} b{BATCH}", ms=host, wall_ms=wall, fenced=fenced, **counts)
        lines.append(
            f"{name:<10} {counts['ops']:>5} {counts['views']:>5} {counts['copies']:>6} "
            f"{counts['cats']:>4} {counts['syncs']:>5} {host:>8.2f} "
            f"{wall if wall is not None else float('nan'):>8.2f} {counts['kernel_ops']:>10}  "
            f"{counts['top']}" + (f" ({fenced})" if fenced else "")
        )
    print("\n".join(lines), flush=True)

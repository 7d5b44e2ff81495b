"""Which dispatcher's gradients are right: nam56r-small's E layer, and the model cut to one pattern
(12 layers), with megatron's alltoall dispatcher and with nam-spec's local one in bf16, against the
same weights in float64 on the CPU (where both dispatchers agree to the last bit).

    NAM_COMMIT=<sha> bash bench/gpu.sh moe_dispatch
    NAM_MOE_DISPATCH_DEVICE=cpu NAM_MOE_DISPATCH_TOKENS=512 uv run --frozen python bench/run.py moe_dispatch

On the CPU the bf16 runs take nam-mixers' Triton kernels under the Triton interpreter (fp32 sums,
one rounding: the GPU's arithmetic) where the local backend would take their references; megatron's
scatter-add is its bf16 one there too.

Why: in bench/trainer.py (H100, 2026-12-07) the local dispatcher's step-0 gradient of a router
weight differed from alltoall's by 37%, and its losses on the fixed batch by 3% at step 4, while
three alltoall runs agreed within 0.3%. On CUDA the two differ in how a token's top-k expert rows
are summed: nam-mixers' Triton pair sums (fp32, one rounding) against megatron's bf16 scatter-add.

Cases, the same weights everywhere:
- ``layer``: the E layer (hidden 2048, 16 experts top-4 of FFN 512, shared expert 576, sigmoid
  router with expert bias) on TOKENS tokens of N(0, 1); loss <output, w> for a fixed random w.
- ``model``: nam56r-small's configuration on AEMEAEMEAEMR once (4 E layers), one row of
  MODEL_SEQ random tokens and structure channels, the mean per-token loss; only the router
  weights' gradients are compared (the ill-conditioned ones).

Rows: each dispatcher's relative error (norm of the difference over the norm of float64's) of
every compared gradient, and of the two dispatchers' from each other. Checks: the layer's output
within 1e-2, and the local dispatcher's error at most 1.5x alltoall's for every compared gradient
(it must not be the less accurate one).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from bench.report import Report
from bench.world import one_rank_world

TOKENS = int(os.environ.get("NAM_MOE_DISPATCH_TOKENS", "4096"))
MODEL_SEQ = 1024  # float64 on the CPU: the model case takes ~50 s there on 2 cores
DEVICE = os.environ.get("NAM_MOE_DISPATCH_DEVICE", "cuda")
OUTPUT_TOL = 1e-2
LESS_ACCURATE = 1.5  # local / alltoall error against float64
DISPATCHERS = ("alltoall", "local")


def _config(dispatcher: str, seq_length: int) -> Any:
    from nam_trainer.config import load_config

    base = load_config("nam56r-small").model
    return base.replace(moe=replace(base.moe, dispatcher=dispatcher), seq_length=seq_length)


def _layer(dispatcher: str) -> Any:
    import torch
    from megatron.core.transformer.spec_utils import build_module

    from nam_layout import Layout
    from nam_runtime.megatron import reset_moe_state
    from nam_spec.backends import local_backend
    from nam_spec.letters import LETTERS
    from nam_spec.transformer_config import transformer_config

    reset_moe_state()
    config = _config(dispatcher, TOKENS)
    tc = transformer_config(config, Layout.tile("E", 1), letter="E")
    torch.manual_seed(0)
    return build_module(LETTERS["E"].spec(local_backend(), config), config=tc, layer_number=1)


def _model(dispatcher: str) -> Any:
    import torch

    from nam_layout import Layout
    from nam_runtime.megatron import reset_moe_state
    from nam_spec.model import build_model

    reset_moe_state()
    config = _config(dispatcher, MODEL_SEQ).replace(params_dtype="float32")
    torch.manual_seed(0)
    return build_model(Layout.tile("AEMEAEMEAEMR", 12), config)


def _compare(report: Report, case: str, build: Any, loss: Any, wanted: Any, output_checked: bool) -> None:
    """``build(dispatcher)`` in float64 on the CPU, then in bf16 on DEVICE under each dispatcher with
    the float64 one's weights; ``loss(module, device)`` -> (loss, output); ``wanted(name)``: which
    parameters' gradients are compared."""
    import torch

    def run(module: Any, device: str) -> tuple[Any, dict[str, Any]]:
        value, output = loss(module, device)
        value.backward()
        grads = {
            n: p.grad.double().cpu() for n, p in module.named_parameters() if p.grad is not None and wanted(n)
        }
        return output.detach().double().cpu(), grads

    reference = build("alltoall").to("cpu", torch.float64)
    state = {k: v for k, v in reference.state_dict().items() if isinstance(v, torch.Tensor)}
    truth_out, truth = run(reference, "cpu")
    del reference
    grads: dict[str, dict[str, Any]] = {}
    for dispatcher in DISPATCHERS:
        module = build(dispatcher).to(DEVICE, torch.bfloat16)
        module.load_state_dict(
            {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}, strict=False
        )
        out, grads[dispatcher] = run(module, DEVICE)
        del module
        if output_checked:
            error = float((out - truth_out).norm() / truth_out.norm())
            report.check(f"{case}, {dispatcher}: bf16 output vs float64", error, OUTPUT_TOL)
    for name, true in truth.items():
        errors = {d: float((grads[d][name] - true).norm() / true.norm()) for d in DISPATCHERS}
        between = float(
            (grads["local"][name] - grads["alltoall"][name]).norm() / grads["alltoall"][name].norm()
        )
        short = name.removeprefix("decoder.").removeprefix("mlp.")
        report.row(f"{case}: {short} gradient, bf16 vs float64", **errors, local_vs_alltoall=between)
        report.check(
            f"{case}: {short} gradient, local / alltoall error vs float64 - {LESS_ACCURATE}",
            max(errors["local"] / errors["alltoall"] - LESS_ACCURATE, 0.0),
            0.0,
        )


def _kernels_as_on_the_gpu() -> None:
    """The experts' and the local dispatcher's ops on their Triton kernels, interpreted."""
    from functools import partial

    from nam_mixers.ops import moe
    from nam_spec.local import dispatcher, experts

    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is first compiled
    experts.weighted_swiglu = partial(moe.weighted_swiglu, path="triton")
    dispatcher.sum_pairs = partial(moe.sum_pairs, path="triton")


def main(report: Report) -> None:
    import torch

    if DEVICE == "cpu":
        _kernels_as_on_the_gpu()
    gen = torch.Generator().manual_seed(1)
    hidden = _config("alltoall", TOKENS).hidden_size
    x = torch.randn(TOKENS, 1, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(TOKENS, 1, hidden, generator=gen, dtype=torch.float64)

    def layer_loss(module: Any, device: str) -> tuple[Any, Any]:
        dtype = next(module.parameters()).dtype
        out = module(x.to(device, dtype))[0]
        return (out.double() * w.to(device)).sum(), out

    config = _config("alltoall", MODEL_SEQ)
    ids = torch.randint(0, config.vocab_size, (2, 1, MODEL_SEQ), generator=gen)
    channels = config.embedding.structure_config()
    structure = {
        n: torch.randint(0, channels.schema[n].vocab, (1, MODEL_SEQ), generator=gen)
        for n in channels.channels
    }

    def model_loss(module: Any, device: str) -> tuple[Any, Any]:
        per_token = module(
            ids[0].to(device),
            torch.arange(MODEL_SEQ, device=device).expand(1, MODEL_SEQ),
            labels=ids[1].to(device),
            structure={n: c.to(device) for n, c in structure.items()},
        )
        return per_token.double().mean(), per_token

    with one_rank_world():
        _compare(report, "layer", _layer, layer_loss, lambda name: True, output_checked=True)
        _compare(report, "model", _model, model_loss, lambda name: name.endswith("router.weight"), False)

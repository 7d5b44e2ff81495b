"""Which dispatcher's gradients are right: one E layer of nam56r-small with megatron's alltoall
dispatcher and with nam-spec's local one, in bf16 on the GPU, against the same layer in float64 on
the CPU (where both dispatchers agree to the last bit).

    NAM_COMMIT=<sha> bash bench/gpu.sh moe_dispatch
    NAM_MOE_DISPATCH_DEVICE=cpu NAM_MOE_DISPATCH_TOKENS=512 uv run --frozen python bench/run.py moe_dispatch

On the CPU the bf16 runs take nam-mixers' Triton kernels under the Triton interpreter (fp32 sums,
one rounding: the GPU's arithmetic) where the local backend would take their references; megatron's
scatter-add is its bf16 one there too.

Why: in bench/trainer.py (H100, 2026-12-07) the local dispatcher's step-0 gradient of a router
weight differed from alltoall's by 37%, and its losses on the fixed batch by 3% at step 4, while
three alltoall runs agreed within 0.3%. On CUDA the two differ in how a token's top-k expert rows
are summed: nam-mixers' Triton pair sums (fp32, one rounding) against megatron's bf16 scatter-add.

Shapes: nam56r-small's E layer (hidden 2048, 16 experts top-4 of FFN 512, shared expert 576,
sigmoid router with expert bias), 4096 tokens of N(0, 1), the same weights everywhere; the loss is
<output, w> for a fixed random w. Rows: each dispatcher's relative error (norm of the difference
over the norm of float64's) of the output and of every parameter's gradient; checks: the output
within 1e-2, and the local dispatcher's worst gradient error at most 1.5x alltoall's on the same
parameter (it must not be the less accurate one).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from bench.report import Report
from bench.world import one_rank_world

TOKENS = int(os.environ.get("NAM_MOE_DISPATCH_TOKENS", "4096"))
DEVICE = os.environ.get("NAM_MOE_DISPATCH_DEVICE", "cuda")
OUTPUT_TOL = 1e-2


def _layer(dispatcher: str, dtype: Any, device: str) -> Any:
    import torch
    from megatron.core.transformer.spec_utils import build_module

    from nam_layout import Layout
    from nam_runtime.megatron import reset_moe_state
    from nam_spec.backends import local_backend
    from nam_spec.letters import LETTERS
    from nam_spec.transformer_config import transformer_config
    from nam_trainer.config import load_config

    reset_moe_state()
    base = load_config("nam56r-small").model
    config = base.replace(moe=replace(base.moe, dispatcher=dispatcher))
    tc = transformer_config(config, Layout.tile("E", 1), letter="E")
    torch.manual_seed(0)
    return build_module(LETTERS["E"].spec(local_backend(), config), config=tc, layer_number=1).to(
        device, dtype
    )


def _run(layer: Any, x: Any, w: Any) -> tuple[Any, dict[str, Any]]:
    """Output and parameter gradients of <layer(x), w>, in float64 on the CPU."""
    import torch

    x = x.to(next(layer.parameters()).dtype).requires_grad_(True)
    out = layer(x)[0]
    (out.float() * w.to(out.device, torch.float32)).sum().backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach().double().cpu(), grads


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
    with one_rank_world():
        reference = _layer("alltoall", torch.float64, "cpu")
        state = {k: v for k, v in reference.state_dict().items() if isinstance(v, torch.Tensor)}
        hidden = reference.config.hidden_size
        x = torch.randn(TOKENS, 1, hidden, generator=gen, dtype=torch.float64)
        w = torch.randn(TOKENS, 1, hidden, generator=gen, dtype=torch.float64)
        truth_out, truth = _run(reference, x, w)
        errors: dict[str, dict[str, float]] = {}
        for dispatcher in ("alltoall", "local"):
            layer = _layer(dispatcher, torch.bfloat16, DEVICE)
            layer.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=False)
            out, grads = _run(layer, x.to(DEVICE), w)
            output_error = float((out - truth_out).norm() / truth_out.norm())
            report.check(f"{dispatcher}: bf16 output vs float64", output_error, OUTPUT_TOL)
            errors[dispatcher] = {n: float((g - truth[n]).norm() / truth[n].norm()) for n, g in grads.items()}
            worst = max(errors[dispatcher], key=errors[dispatcher].get)
            report.row(
                f"{dispatcher}: bf16 vs float64, {TOKENS} tokens",
                output=output_error,
                worst_grad=errors[dispatcher][worst],
                worst_param=worst,
                **{n.split(".")[-2] + "." + n.split(".")[-1]: e for n, e in errors[dispatcher].items()},
            )
            del layer
        ratio, where = max((errors["local"][n] / errors["alltoall"][n], n) for n in errors["alltoall"])
        report.check(
            f"local / alltoall gradient error vs float64, worst ({where}) - 1.5", max(ratio - 1.5, 0.0), 0.0
        )

"""The output layer's loss: nam-spec's chunked linear cross entropy against the plain path
(megatron's ColumnParallelLinear, then its vocab-parallel cross entropy), forward+backward time
and peak memory.

    bash bench/gpu.sh cross_entropy

Shapes: hidden 2048, vocab 65536 (NAM56R's), 4096 and 16384 tokens (a micro-batch of 1 and of
4 x 4096), bf16, one rank, in chunks of 4096 and 8192 tokens (``model.loss_chunk_tokens``). The
gradient of the per-token loss is a random per-token scale, as a loss mask over a token count is.
Checks first, at each token count: the fused per-token loss, input gradient and weight gradient
against the plain path's (relative norm errors).

Floor per row: the matmul FLOPs over 700 TFLOP/s (the measured bf16 matmul median of
RESULTS.md): 3 x 2 x tokens x hidden x vocab for the plain path (logits, input and weight
gradients), 4 x for the fused one, whose backward recomputes the logits. ``peak GiB`` is what
forward+backward allocates beyond the inputs and the weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.report import Report
from bench.world import one_rank_world

HIDDEN, VOCAB = 2048, 65536
TOKENS = (4096, 16384)
CHUNKS = (4096, 8192)
MATMUL_TFLOPS = 700.0


def floor_ms(tokens: int, fused: bool) -> float:
    """Matmul FLOPs of forward+backward at the measured bf16 rate: three matmuls of tokens x hidden
    x vocab, a fourth for the fused path's recomputed logits."""
    return (4 if fused else 3) * 2 * tokens * HIDDEN * VOCAB / (MATMUL_TFLOPS * 1e12) * 1e3


def paths(
    tokens: int, hidden: int, vocab: int, chunk_tokens: int, device: str, dtype: Any, seed: int = 0
) -> tuple[dict[str, Callable[[], dict[str, Any]]], Any]:
    """``{"plain": run, "fused": run}`` on one batch (each run: forward+backward, returning the
    per-token loss [1, tokens] and the input and weight gradients) and the output layer. Needs
    megatron's parallel state (one rank)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy
    from megatron.core.transformer import TransformerConfig

    from nam_spec.cross_entropy import linear_cross_entropy

    group = parallel_state.get_tensor_model_parallel_group()
    gen = torch.Generator(device=device).manual_seed(seed)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device == "cpu",
    )
    layer = ColumnParallelLinear(
        hidden,
        vocab,
        config=config,
        init_method=torch.nn.init.zeros_,
        bias=False,
        gather_output=False,
        tp_group=group,
    ).to(device)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02, generator=gen)
    # [s, b, h] with b = 1, as the model's output layer sees it
    x = torch.randn(tokens, 1, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), device=device, generator=gen)
    scale = torch.rand(1, tokens, device=device, generator=gen) / tokens

    def plain() -> Any:
        logits, _ = layer(x)
        return vocab_parallel_cross_entropy(logits, labels.t().contiguous(), tp_group=group).t()

    def fused() -> Any:
        return linear_cross_entropy(
            x, layer.weight, labels, group, sequence_parallel=False, chunk_tokens=chunk_tokens
        )

    def step(loss_fn: Callable[[], Any]) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            x.grad = layer.weight.grad = None
            loss = loss_fn()
            loss.backward(scale)
            out = {"loss": loss.detach(), "input": x.grad, "weight": layer.weight.grad}
            x.grad = layer.weight.grad = None  # a timed repeat starts from nothing held
            return out

        return run

    return {"plain": step(plain), "fused": step(fused)}, layer


def check(report: Report, runs: dict[str, Callable[[], dict[str, Any]]], case: str) -> None:
    """Relative norm errors of the fused loss and gradients against the plain path's."""
    plain, fused = runs["plain"](), runs["fused"]()
    for what, tol in (("loss", 1e-3), ("input", 1e-2), ("weight", 1e-2)):
        want, got = plain[what].float(), fused[what].float()
        report.check(f"{case} {what}: fused vs plain", float((got - want).norm() / want.norm()), tol)


def main(report: Report) -> None:
    with one_rank_world():
        _bench(report)


def _bench(report: Report) -> None:
    import torch

    chunk = CHUNKS[0]
    for tokens in TOKENS:
        for chunk_tokens in CHUNKS:
            runs, layer = paths(tokens, HIDDEN, VOCAB, chunk_tokens, "cuda", torch.bfloat16)
            if chunk_tokens == chunk:
                check(report, runs, f"t{tokens} chunk {chunk_tokens}")
                report.time(f"plain t{tokens}", runs["plain"], floor_ms=floor_ms(tokens, False))
            report.time(
                f"fused t{tokens} chunk {chunk_tokens}", runs["fused"], floor_ms=floor_ms(tokens, True)
            )
            del runs, layer

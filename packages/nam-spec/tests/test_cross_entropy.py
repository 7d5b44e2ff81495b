"""The chunked linear cross entropy against the plain path (megatron's ColumnParallelLinear, then
its vocab-parallel cross entropy): per-token loss, input and weight gradients, at TP=1 for several
chunk sizes and at TP=2 with and without sequence parallelism (two gloo ranks)."""

from __future__ import annotations

import pytest
import torch

from nam_runtime import dist
from nam_runtime.testing import run_ranks

S, B, H, VOCAB = 10, 2, 16, 48  # 20 tokens


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input [s, b, h], full weight [vocab, h], labels [b, s], a per-token loss scale [b, s] (a loss
    mask over a token count, as the trainer's)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(S, B, H, generator=g).to(dtype)
    weight = (torch.randn(VOCAB, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    scale = (torch.rand(B, S, generator=g) > 0.3).float() / 7
    return hidden, weight, labels, scale


def _run(tp: int, sequence_parallel: bool, chunk_tokens: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Both paths on this rank's shards: losses [b, s], this rank's part of the input gradient (its
    sequence shard under SP) and the gradient of its weight shard, plain and fused."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy
    from megatron.core.transformer import TransformerConfig

    from nam_spec.cross_entropy import linear_cross_entropy

    group = parallel_state.get_tensor_model_parallel_group()
    rank = group.rank()
    hidden, weight, labels, scale = _inputs(dtype)
    shard = VOCAB // tp
    weight = weight[rank * shard : (rank + 1) * shard]
    if sequence_parallel:
        hidden = hidden[rank * S // tp : (rank + 1) * S // tp]
    config = TransformerConfig(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=2,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        use_cpu_initialization=True,
    )
    layer = ColumnParallelLinear(
        H,
        VOCAB,
        config=config,
        init_method=torch.nn.init.zeros_,
        bias=False,
        gather_output=False,
        tp_group=group,
    )
    out = {}
    for name in ("plain", "fused"):
        with torch.no_grad():
            layer.weight.copy_(weight)
        layer.weight.grad = None
        x = hidden.clone().requires_grad_()
        if name == "plain":
            logits, _ = layer(x)
            loss = vocab_parallel_cross_entropy(logits, labels.t().contiguous(), tp_group=group).t()
        else:
            loss = linear_cross_entropy(
                x, layer.weight, labels, group, sequence_parallel=sequence_parallel, chunk_tokens=chunk_tokens
            )
        (loss * scale).sum().backward()
        out[name] = {"loss": loss.detach(), "input": x.grad, "weight": layer.weight.grad}
    return out


def _compare(out: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert out["fused"]["loss"].shape == (B, S) and out["fused"]["loss"].dtype == torch.float32
    for what in ("loss", "input", "weight"):
        fused, plain = out["fused"][what], out["plain"][what]
        assert fused.dtype == plain.dtype, what
        torch.testing.assert_close(fused, plain, rtol=rtol, atol=atol, msg=what)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 20, 64])  # 7 does not divide the 20 tokens
def test_tp1_matches_the_plain_path(chunk_tokens: int, megatron_single_rank: None) -> None:
    _compare(_run(1, False, chunk_tokens, torch.float32))


def test_tp1_bf16_matches_the_plain_path(megatron_single_rank: None) -> None:
    """Logits rounded to bf16 before the fp32 loss, as the plain path rounds them; gradients in
    bf16 (the weight gradient's chunks summed in fp32)."""
    _compare(_run(1, False, 8, torch.bfloat16), rtol=2e-2, atol=2e-3)


def _tp2_rank(sequence_parallel: bool, chunk_tokens: int) -> dict:
    dist.initialize(tensor_parallel=2, seed=1)
    return _run(2, sequence_parallel, chunk_tokens, torch.float32)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_matches_the_plain_path(sequence_parallel: bool) -> None:
    ranks = run_ranks(_tp2_rank, 2, sequence_parallel, 6)
    for out in ranks:
        _compare(out)
    # every rank returns the loss of every token
    torch.testing.assert_close(ranks[0]["fused"]["loss"], ranks[1]["fused"]["loss"], rtol=0, atol=0)


def test_bad_chunk_size_is_refused() -> None:
    from nam_spec.cross_entropy import linear_cross_entropy

    with pytest.raises(ValueError, match="chunk_tokens must be >= 1, got 0"):
        linear_cross_entropy(
            torch.zeros(1, 1, 2),
            torch.zeros(3, 2),
            torch.zeros(1, 1),
            None,
            sequence_parallel=False,
            chunk_tokens=0,
        )


@pytest.mark.parametrize("untie_output", [True, False])  # False: the embedding's weight, passed as weight=
def test_model_loss_and_gradients_equal_with_and_without_chunks(
    untie_output: bool, megatron_single_rank: None
) -> None:
    """A small model with one multi-token-prediction depth (which reuses the output layer): the
    per-token losses and every parameter's gradient, chunked (5 tokens: not a divisor of 16) and not."""
    from helpers import tiny

    from nam_layout import Layout
    from nam_spec.model import build_model

    layout = Layout.tile("AEMR-", 5)
    models = []
    for chunk in (0, 5):
        torch.manual_seed(0)
        models.append(
            build_model(layout, tiny(mtp_depth=1, untie_output=untie_output, loss_chunk_tokens=chunk))
        )
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    scale = torch.rand(2, 2, 8, generator=torch.Generator().manual_seed(6))
    out = []
    for model in models:
        losses = model.train()(ids, torch.arange(8).expand(2, 8), labels=ids)
        (losses * scale).sum().backward()
        out.append((losses.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = out
    assert fused.shape == (2, 2, 8)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("chunk", [-1, 2.5, True])
def test_bad_loss_chunk_is_one_problem(chunk: object) -> None:
    from helpers import tiny

    from nam_layout import Layout
    from nam_spec.validation import problems

    (problem,) = problems(tiny(loss_chunk_tokens=chunk), Layout.tile("A", 1))
    assert (
        problem == f"model.loss_chunk_tokens {chunk!r} must be an integer >= 0 (0: the whole logits at once)"
    )

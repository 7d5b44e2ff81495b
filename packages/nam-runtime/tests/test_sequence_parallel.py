"""Sequence parallelism at TP=2 over gloo: megatron's column- and row-parallel linears, whose
backward all-gathers and reduce-scatters on `torch.cuda.current_device()`, give the gradients of
the dense computation, whether autograd starts from `Tensor.backward` or `torch.autograd.grad`."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from nam_runtime import dist
from nam_runtime.testing import run_ranks

SEQ, HIDDEN, FFN = 8, 8, 12


def _gather(shard: torch.Tensor, dim: int) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim)


def _sp_gradients(start: str) -> dict[str, float]:
    """Largest gap between the TP=2 sequence-parallel gradients and the dense ones, per tensor."""
    dist.initialize(tensor_parallel=2, seed=5)
    rank = parallel_state.get_tensor_model_parallel_rank()
    config = ModelParallelConfig(
        tensor_model_parallel_size=2, sequence_parallel=True, use_cpu_initialization=True
    )
    init = torch.nn.init.xavier_normal_
    up = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=False)
    down = RowParallelLinear(
        FFN, HIDDEN, config=config, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=True
    )
    x = torch.randn(SEQ, 1, HIDDEN, generator=torch.Generator().manual_seed(0))
    local = x.chunk(2)[rank].clone().requires_grad_()  # this rank's slice of the sequence
    hidden, _ = up(local)
    out, _ = down(torch.relu(hidden))
    loss = (out**2).sum()  # the per-rank part of the loss; the TP ranks' parts add up to the whole
    if start == "backward":
        loss.backward()
        grads = (local.grad, up.weight.grad, down.weight.grad)
    else:
        grads = torch.autograd.grad(loss, (local, up.weight, down.weight))

    w_up, w_down = _gather(up.weight.detach(), 0), _gather(down.weight.detach(), 1)
    dense_x = x.clone().requires_grad_()
    w_up.requires_grad_(), w_down.requires_grad_()
    (dense_x @ w_up.T).relu().matmul(w_down.T).pow(2).sum().backward()
    expected = (dense_x.grad.chunk(2)[rank], w_up.grad.chunk(2, 0)[rank], w_down.grad.chunk(2, 1)[rank])
    return {
        name: (got - want).abs().max().item() / want.abs().max().item()
        for name, got, want in zip(("input", "up", "down"), grads, expected, strict=True)
    }


@pytest.mark.parametrize("start", ["backward", "autograd.grad"])
def test_tp2_sequence_parallel_gradients_equal_dense(start: str) -> None:
    for gaps in run_ranks(_sp_gradients, 2, start):
        assert max(gaps.values()) < 1e-5, gaps

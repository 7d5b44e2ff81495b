"""TP=2 over gloo on megatron's local dense GPT: the TP=1 loss curve, and a dist_checkpointing
checkpoint saved at TP=2 loads at TP=1 with identical outputs."""

from __future__ import annotations

import gpt
import pytest
import torch
from megatron.core import parallel_state, tensor_parallel

from nam_runtime import dist
from nam_runtime.testing import run_ranks

STEPS = 3


def _per_token_loss(module: torch.nn.Module) -> list[list[float]]:
    data = gpt.batch(99, 2)
    with torch.no_grad():
        return module(data["tokens"], data["position_ids"], None, labels=data["labels"]).tolist()


def _tp_run(tp: int, checkpoint: str) -> tuple[list[float], list[list[float]]]:
    """Train STEPS on one batch; at TP=2 save the result, at TP=1 load TP=2's checkpoint into a
    fresh model. Returns the losses and the per-token loss of the trained or loaded model."""
    dist.initialize(tensor_parallel=tp, seed=7)
    model = gpt.model(gpt.config(moe=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # as a trainer does: the first rank of the TP group reads the batch, megatron broadcasts it
    local = gpt.batch(0, 4) if parallel_state.get_tensor_model_parallel_rank() == 0 else {}
    data = tensor_parallel.broadcast_data(list(gpt.batch(0, 4)), local, torch.int64)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = gpt.loss(model, data)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if tp > 1:
        gpt.save(model, checkpoint)
    else:
        model = gpt.model(gpt.config(moe=False))
        gpt.load(model, checkpoint)
    return losses, _per_token_loss(model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[tuple[list[float], list[list[float]]]]]:
    checkpoint = str(tmp_path_factory.mktemp("tp2"))
    tp2 = run_ranks(_tp_run, 2, tp=2, checkpoint=checkpoint)
    tp1 = run_ranks(_tp_run, 1, tp=1, checkpoint=checkpoint)
    return {1: tp1, 2: tp2}


def test_tp2_matches_tp1(runs: dict[int, list[tuple[list[float], list[list[float]]]]]) -> None:
    ((reference, _),) = runs[1]
    (rank0, _), (rank1, _) = runs[2]
    assert rank0 == rank1
    torch.testing.assert_close(torch.tensor(rank0), torch.tensor(reference), rtol=1e-5, atol=1e-6)
    assert reference[-1] < reference[0] - 0.05, reference


def test_checkpoint_saved_at_tp2_loads_at_tp1(
    runs: dict[int, list[tuple[list[float], list[list[float]]]]],
) -> None:
    ((_, loaded),) = runs[1]
    (_, saved0), (_, saved1) = runs[2]
    assert saved0 == saved1
    torch.testing.assert_close(torch.tensor(loaded), torch.tensor(saved0), rtol=1e-5, atol=1e-6)
    assert torch.tensor(loaded).std() > 0  # a real output, not a constant

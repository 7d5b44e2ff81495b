"""megatron's training path on CPU: DDP wrapper, distributed optimizer, forward-backward schedules
on the local GPT (attention, dense MLP, MoE 4 experts top-2). DP=2 and PP=2 give the DP=1 losses
on the same global batch."""

from __future__ import annotations

import gpt
import pytest
import torch

from nam_runtime import dist
from nam_runtime.testing import run_ranks

STEPS = 4


def _train(*, pp: int = 1, **init: str) -> list[float]:
    dist.initialize(pipeline_parallel=pp, seed=11)
    return gpt.train(steps=STEPS, global_batch=4, micro_batch=2, **init)


@pytest.fixture(scope="module")
def initial(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The single-process run saves its initial weights here; the other layouts load them (a model
    built at PP=2 draws its weights in another order)."""
    return str(tmp_path_factory.mktemp("initial"))


@pytest.fixture(scope="module")
def reference(initial: str) -> list[float]:
    (losses,) = run_ranks(_train, 1, save_init=initial)
    return losses


def test_single_process_trains(reference: list[float]) -> None:
    assert len(reference) == STEPS
    assert all(torch.isfinite(torch.tensor(reference)))
    assert reference[-1] < reference[0] - 0.05, reference


def test_dp2_distributed_optimizer_matches_dp1(reference: list[float], initial: str) -> None:
    rank0, rank1 = run_ranks(_train, 2, load_init=initial)
    assert rank0 == rank1
    torch.testing.assert_close(torch.tensor(rank0), torch.tensor(reference), rtol=1e-5, atol=1e-6)


def test_pp2_schedule_matches_pp1(reference: list[float], initial: str) -> None:
    rank0, rank1 = run_ranks(_train, 2, pp=2, load_init=initial)
    assert rank0 == rank1
    torch.testing.assert_close(torch.tensor(rank0), torch.tensor(reference), rtol=1e-5, atol=1e-6)

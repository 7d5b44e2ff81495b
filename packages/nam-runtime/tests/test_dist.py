"""nam_runtime.dist: layout errors before any set-up, a world of one without torchrun's variables,
and a teardown clean enough for a second initialize in the same process (a world of one: a
larger world would need a fresh rendezvous port for the second round)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as torch_dist

from nam_runtime import dist
from nam_runtime.testing import run_ranks


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (
            {"tensor_parallel": 3},
            r"world size 1 is not divisible by tensor_parallel x pipeline_parallel = 3 x 1",
        ),
        (
            {"data_parallel": 2},
            r"data_parallel=2 but world size 1 / \(tensor_parallel 1 x pipeline_parallel 1\) = 1",
        ),
        ({"expert_parallel": 2}, r"expert_parallel=2 must divide the data-parallel size 1"),
        ({"pipeline_parallel": 0}, r"pipeline_parallel=0: parallel sizes must be >= 1"),
        ({"expert_tensor_parallel": 0}, r"expert_tensor_parallel=0: parallel sizes must be >= 1"),
        (
            {"expert_tensor_parallel": 2},
            r"expert_tensor_parallel=2: expert_tensor_parallel x expert_parallel x pipeline_parallel = 2 x 1 x 1 "
            r"must divide the world size 1; accepted expert_tensor_parallel values with expert_parallel=1, "
            r"pipeline_parallel=1: \[1\]",
        ),
    ],
)
def test_bad_layouts_fail_before_any_set_up(sizes: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dist.initialize(**sizes)
    assert not dist.is_initialized() and not torch_dist.is_initialized()


def _twice() -> list[tuple[int, int, int, str, str]]:
    from megatron.core import parallel_state

    worlds = []
    for _ in range(2):
        world = dist.initialize(seed=3)
        with pytest.raises(RuntimeError, match="initialize called twice"):
            dist.initialize()
        assert parallel_state.model_parallel_is_initialized()
        worlds.append(
            (world.tensor_parallel, world.data_parallel, world.world_size, world.backend, world.device.type)
        )
        dist.teardown()
        dist.teardown()  # idempotent
        assert not torch_dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
    return worlds


def test_teardown_is_clean_enough_to_initialize_again() -> None:
    if torch.cuda.is_available():
        pytest.skip("the CPU layout of this test: gloo and the CPU device")
    assert run_ranks(_twice, 1) == [[(1, 1, 1, "gloo", "cpu")] * 2]


def _expert_grid() -> tuple[int, ...]:
    from megatron.core import parallel_state as ps

    world = dist.initialize(tensor_parallel=2, expert_tensor_parallel=1, expert_parallel=2)
    ep_ranks = torch_dist.get_process_group_ranks(ps.get_expert_model_parallel_group())
    etp_ranks = torch_dist.get_process_group_ranks(ps.get_expert_tensor_parallel_group())
    return (
        (world.tensor_parallel, world.expert_tensor_parallel, world.expert_parallel, world.data_parallel),
        (ps.get_tensor_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()),
        (ps.get_expert_model_parallel_world_size(), ps.get_expert_data_parallel_world_size()),
        tuple(ep_ranks),
        tuple(etp_ranks),
    )


def test_expert_tensor_parallel_gives_experts_their_own_grid() -> None:
    # 4 ranks, dense TP=2 x DP=2; experts ETP=1 x EP=2 x expert DP=2: a dense TP pair holds two experts' ranks
    grids = run_ranks(_expert_grid, 4)
    for rank, (sizes, tp_etp, ep_edp, ep_ranks, etp_ranks) in enumerate(grids):
        assert sizes == (2, 1, 2, 2) and tp_etp == (2, 1) and ep_edp == (2, 2)
        assert ep_ranks == ((0, 1) if rank < 2 else (2, 3)) and etp_ranks == (rank,)

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

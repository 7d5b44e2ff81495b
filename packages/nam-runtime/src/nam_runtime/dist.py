"""Process group and megatron-core parallel state from one call, and their teardown.

Rank, world size and rendezvous come from the environment torchrun (and
`nam_runtime.testing.run_ranks`) sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
A process started without them is a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from nam_runtime import cpu
from nam_runtime.testing import free_port

__all__ = ["World", "initialize", "is_initialized", "teardown"]


@dataclass(frozen=True)
class World:
    """What `initialize` set up for this process."""

    rank: int
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    expert_parallel: int
    expert_tensor_parallel: int  # the tensor-parallel size of expert layers (the TP size unless set)
    data_parallel: int
    seed: int
    device: torch.device
    backend: str


_WORLD: World | None = None
_OWNS_PROCESS_GROUP = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _check_sizes(world_size: int, tp: int, pp: int, ep: int, etp: int | None, dp: int | None) -> int:
    sizes = {
        "tensor_parallel": tp,
        "pipeline_parallel": pp,
        "expert_parallel": ep,
        "expert_tensor_parallel": etp,
    }
    for name, size in sizes.items():
        if size is not None and size < 1:
            raise ValueError(f"{name}={size}: parallel sizes must be >= 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = {tp} x {pp}"
        )
    derived_dp = world_size // (tp * pp)
    if dp is not None and dp != derived_dp:
        raise ValueError(
            f"data_parallel={dp} but world size {world_size} / (tensor_parallel {tp} x pipeline_parallel "
            f"{pp}) = {derived_dp}; leave data_parallel unset or make them agree"
        )
    if etp is None and derived_dp % ep != 0:
        raise ValueError(
            f"expert_parallel={ep} must divide the data-parallel size {derived_dp} "
            f"(world {world_size} / tensor_parallel {tp} / pipeline_parallel {pp})"
        )
    # megatron's expert grid: world = expert_tensor_parallel x expert_parallel x pipeline x expert data
    if etp is not None and world_size % (etp * ep * pp) != 0:
        accepted = [size for size in range(1, world_size + 1) if world_size % (size * ep * pp) == 0]
        raise ValueError(
            f"expert_tensor_parallel={etp}: expert_tensor_parallel x expert_parallel x pipeline_parallel = "
            f"{etp} x {ep} x {pp} must divide the world size {world_size}; accepted expert_tensor_parallel "
            f"values with expert_parallel={ep}, pipeline_parallel={pp}: {accepted}"
        )
    return derived_dp


def initialize(
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
    data_parallel: int | None = None,
    seed: int = 1234,
    timeout_s: float = 120.0,
) -> World:
    """Set up torch.distributed (gloo on CPU, NCCL on GPU), megatron-core's parallel state and
    its RNG tracker; on CPU first install `nam_runtime.cpu`'s patches.

    `expert_tensor_parallel` splits the expert layers over that many ranks instead of the
    tensor-parallel size (megatron's expert grid: world = ETP x EP x PP x expert DP).
    `data_parallel` is derived from the world size; pass it to have that checked. `timeout_s`
    bounds every collective, so a hang fails instead of stalling. Call `teardown()` to undo.
    """
    global _WORLD, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if _WORLD is not None:
        raise RuntimeError("nam_runtime.dist.initialize called twice; call nam_runtime.dist.teardown() first")
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    dp = _check_sizes(
        world_size, tensor_parallel, pipeline_parallel, expert_parallel, expert_tensor_parallel, data_parallel
    )
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu.enable()
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        local_rank = _env_int("LOCAL_RANK", rank % torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=timeout_s)
    if not torch_dist.is_initialized():
        # One rank without a launcher's rendezvous: a fresh port each time, kept out of the
        # environment (a port left there was inherited by spawned children while still bound).
        init_method = None
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            init_method = f"tcp://127.0.0.1:{free_port()}"
        torch_dist.init_process_group(
            backend=backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
        )
        _OWNS_PROCESS_GROUP = True
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        distributed_timeout_minutes=max(1, round(timeout_s / 60)),
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    _WORLD = World(
        rank=rank,
        world_size=world_size,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        expert_parallel=expert_parallel,
        expert_tensor_parallel=tensor_parallel if expert_tensor_parallel is None else expert_tensor_parallel,
        data_parallel=dp,
        seed=seed,
        device=device,
        backend=backend,
    )
    return _WORLD


def is_initialized() -> bool:
    return _WORLD is not None


def teardown() -> None:
    """Destroy megatron's parallel state and the process group this module created. Idempotent."""
    global _WORLD, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
    _WORLD = None

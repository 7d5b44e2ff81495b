"""What goes in a checkpoint: megatron's sharded state dicts of the model chunks and the optimizer,
the RNG state of every rank, and the caller's `state` (plain values, the same on every rank).
The optimizer's state dict (optimizer_sharded_state_dict, load_optimizer_state) and the schedule
(schedule_state) are nam_runtime.megatron's, with the workarounds megatron needs around them."""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as torch_dist

from nam_trainer.train.checkpoint.errors import CheckpointError

if TYPE_CHECKING:
    from megatron.core.transformer.module import MegatronModule

# megatron's sharded-state-dict options, stored in the checkpoint (content metadata) and reused
# when it is loaded. fully_reshardable: the distributed optimizer's state per model parameter, in
# the parameter's shape and sharding (gathered over data-parallel ranks on save), so a checkpoint
# loads at any parallel layout; dp_reshardable (each rank its buffer shard) reloads at its own only.
SHARDED_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def unwrap(model: list[MegatronModule]) -> list[MegatronModule]:
    """The model chunks without DDP / Float16Module wrappers, whose sharded keys carry no prefix."""
    from megatron.core.utils import unwrap_model

    if not isinstance(model, list) or not model:
        raise CheckpointError(f"model must be a non-empty list of model chunks, got {type(model).__name__}")
    return unwrap_model(model)


def model_sharded(chunks: list[MegatronModule], metadata: dict[str, Any]) -> dict[str, Any]:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}


def load_model(chunks: list[MegatronModule], loaded: dict[str, Any]) -> None:
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])


# ------------------------------------------------------------------------------------------------
# RNG
# ------------------------------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracked = tracker.get_states() if tracker.is_initialized() else None
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None,
        "megatron_tracker": None if tracked is None else {k: _copy(v) for k, v in tracked.items()},
    }


def restore_rng(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch_cpu"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    if states["megatron_tracker"] is not None:
        get_cuda_rng_tracker().set_states({k: _copy(v) for k, v in states["megatron_tracker"].items()})


def derive_rng(seed: int, step: int) -> None:
    """Seed every RNG (python, numpy, torch, megatron's tracker, which offsets it per model-parallel
    rank) from the run's seed and the step a resume continues from: the RNG of a resume at another
    parallel layout, where the saved per-rank states have no counterpart."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    derived = (seed + 1_000_003 * step) % 2**31  # distinct per step, within numpy's seed range
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    model_parallel_cuda_manual_seed(derived)


def _copy(state: Any) -> Any:
    """A tracker state: a byte tensor (copied: the tracker replaces, never mutates, it), or with
    megatron's CUDA-graph-safe RNG a generator object, kept as it is."""
    return state.clone() if isinstance(state, torch.Tensor) else state


def rng_object(states: dict[str, Any] | None) -> Any:
    """This rank's RNG states as its own entry of a world-sized sharded object."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    return ShardedObject("rng_state", states, (world,), (rank,), replica_id=0)


# ------------------------------------------------------------------------------------------------
# The caller's state
# ------------------------------------------------------------------------------------------------

_PLAIN = (type(None), bool, int, float, str)


def check_plain(value: Any, where: str) -> None:
    """`state` holds plain Python values (compared across ranks, stored in the common file)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"save_checkpoint: {where} has key {key!r}; state keys are strings")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise CheckpointError(
            f"save_checkpoint: {where} is a {type(value).__name__}; state holds plain values only "
            "(None, bool, int, float, str and lists/tuples/dicts of them): convert it, e.g. tensor.item()"
        )


def check_same_on_all_ranks(state: dict[str, Any]) -> None:
    gathered: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, state)
    as_text = [json.dumps(other, sort_keys=True) for other in gathered]  # NaN equals NaN here
    differing = [rank for rank, text in enumerate(as_text) if text != as_text[0]]
    if differing:
        raise CheckpointError(
            f"save_checkpoint: `state` differs between rank 0 ({gathered[0]!r}) and ranks {differing} "
            f"(e.g. {gathered[differing[0]]!r}); it is stored once for the whole job, so pass the same "
            "values on every rank (per-rank randomness is saved separately)"
        )

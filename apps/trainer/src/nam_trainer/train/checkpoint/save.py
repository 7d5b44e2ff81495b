"""Writing a checkpoint: every rank its shards into a temporary directory, then rank 0 publishes it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as torch_dist

from nam_runtime.megatron import optimizer_sharded_state_dict, prime_adam_state, schedule_state
from nam_trainer.train.checkpoint import files, marker, state
from nam_trainer.train.checkpoint.errors import CheckpointError

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import MegatronModule


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: list[MegatronModule],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    saved_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write RUN_DIR/checkpoints/step_<step> (every rank calls this with the same `step` and
    `saved_state`); returns its path. Written under a temporary name and renamed once every rank
    has finished; then `latest` names it and only the newest `keep_last` complete checkpoints remain."""
    from megatron.core import dist_checkpointing

    if keep_last < 1:
        raise CheckpointError(f"save_checkpoint: keep_last = {keep_last}; keep at least 1 checkpoint")
    if step < 0:
        raise CheckpointError(f"save_checkpoint: step = {step}; steps are >= 0")
    if not isinstance(saved_state, dict):
        raise CheckpointError(f"save_checkpoint: state must be a dict, got {type(saved_state).__name__}")
    state.check_plain(saved_state, "state")
    rng = state.rng_states()  # before anything below could draw a random number
    chunks = state.unwrap(model)
    prime_adam_state(optimizer)  # a save before the first step: the state Adam would create
    state.check_same_on_all_ranks(saved_state)
    root = Path(run_dir) / files.CHECKPOINTS
    final = root / files.step_dir_name(step)
    tmp = root / f"{files.TMP_PREFIX}{final.name}"
    rank = torch_dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        files.remove_leftovers(root)
        tmp.mkdir()
    torch_dist.barrier()

    metadata = state.SHARDED_METADATA
    sharded = state.model_sharded(chunks, metadata)
    geometry = marker.geometry(sharded)
    sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, sharded, metadata, is_loading=False)
    sharded["scheduler"] = schedule_state(scheduler)
    sharded["state"] = saved_state
    sharded["rng_state"] = state.rng_object(rng)
    dist_checkpointing.save(sharded, str(tmp), content_metadata=dict(metadata))
    torch_dist.barrier()  # every rank's shards are on disk

    if rank == 0:
        layout = marker.parallel_layout(chunks, optimizer)
        text = marker.marker_text(step, layout, metadata["distrib_optim_sharding_type"], geometry)
        files.publish(root, tmp, final, text, keep_last)
    torch_dist.barrier()  # no rank returns before the checkpoint is visible
    return final

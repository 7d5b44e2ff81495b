"""Writing a checkpoint: every rank its shards into a temporary directory, the files' checksums, then
rank 0 publishes it. A save that fails, for lack of space or otherwise, removes its temporary directory
and leaves the last good checkpoint as it was."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as torch_dist

from nam_runtime.megatron import (
    optimizer_sharded_state_dict,
    prime_adam_state,
    schedule_state,
)
from nam_trainer.train.checkpoint import checksums, files, marker, state
from nam_trainer.train.checkpoint.errors import CheckpointError, DiskFull

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import MegatronModule

    from nam_plasticity import Plan

GIB = 2**30


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: list[MegatronModule],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    saved_state: dict[str, Any],
    keep_last: int,
    trained_on: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    plan: Plan | None = None,
) -> Path:
    """Write RUN_DIR/checkpoints/step_<step> (every rank calls this with the same arguments); returns
    its path. Written under a temporary name and renamed once every rank has finished; then `latest`
    names it and only the newest `keep_last` complete checkpoints remain. `trained_on` (the trainer's
    tokenizer and data, nam_trainer.data.trained_on) is recorded for the resume's check, `config` (the
    run's configuration, Config.to_dict) for nam_trainer.use.load to rebuild the model; `plan`'s
    running state (nam-plasticity: DASH's and ReDo's averages) is saved beside the model. Raises
    DiskFull when the filesystem has less free space than the checkpoint's tensors need, or a write
    fails with ENOSPC."""
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
    run_dir = Path(run_dir)
    root = run_dir / files.CHECKPOINTS
    final = root / files.step_dir_name(step)
    tmp = root / f"{files.TMP_PREFIX}{final.name}"
    rank = torch_dist.get_rank()

    metadata = state.SHARDED_METADATA
    sharded = state.model_sharded(chunks, metadata)
    geometry = marker.geometry(sharded)
    levers = plan.stateful() if plan is not None else ()
    if levers:
        sharded["plasticity"] = plan.sharded_state_dict(chunks, optimizer, sharded)
    sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, sharded, metadata, is_loading=False)
    sharded["scheduler"] = schedule_state(scheduler)
    sharded["state"] = saved_state
    sharded["rng_state"] = state.rng_object(rng)

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        files.remove_leftovers(root)  # before measuring the free space: they take some
    need = _tensor_bytes(sharded)
    _check_space(run_dir, step, need, keep_last)
    try:
        if rank == 0:
            tmp.mkdir()
        torch_dist.barrier()
        dist_checkpointing.save(sharded, str(tmp), content_metadata=dict(metadata))
        torch_dist.barrier()  # every rank's shards are on disk
        written = checksums.record(tmp)
        if rank == 0:
            layout = marker.parallel_layout(chunks, optimizer)
            sharding = metadata["distrib_optim_sharding_type"]
            text = marker.marker_text(step, layout, sharding, geometry, trained_on, written, config, levers)
            files.publish(root, tmp, final, text, keep_last)
    except BaseException as exc:
        full = _out_of_space(exc, root, tmp, need)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(
                f"{root}: no space left on device while writing the checkpoint of step {step}; its temporary "
                f"folder is removed; {_last_good(run_dir)}; free space there (or set another checkpoint.dir) "
                "and run the same command to resume"
            ) from None
        raise
    torch_dist.barrier()  # no rank returns before the checkpoint is visible
    return final


def _tensor_bytes(sharded: dict[str, Any]) -> int:
    """The bytes of every tensor the checkpoint will hold, over all ranks (each replica once)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    local = sum(
        v.data.numel() * v.data.element_size()
        for v in nested_values(sharded)
        if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id)
    )
    gathered: list[int] = [0] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, local)
    return sum(gathered)


def _check_space(run_dir: Path, step: int, need: int, keep_last: int) -> None:
    """Raise DiskFull on every rank when rank 0 sees less free space than `need` bytes."""
    root = run_dir / files.CHECKPOINTS
    message = [None]
    if torch_dist.get_rank() == 0:
        free = shutil.disk_usage(root).free
        if free < need:
            message[0] = (
                f"{root}: {free / GIB:.2f} GiB free, the checkpoint of step {step} needs about {need / GIB:.2f} "
                f"GiB (its tensors); nothing was written; {_last_good(run_dir)}; free space there "
                f"(a save needs room for one checkpoint more than checkpoint.keep_last = {keep_last}) or set "
                "another checkpoint.dir, then run the same command to resume"
            )
    torch_dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise DiskFull(message[0])


def _last_good(run_dir: Path) -> str:
    latest = files.find_latest(run_dir)
    return (
        "there is no earlier checkpoint"
        if latest is None
        else f"the last good checkpoint, {latest.name}, is intact"
    )


def _out_of_space(exc: BaseException, root: Path, tmp: Path, need: int) -> bool:
    """Whether a save failed for want of space: ENOSPC in `exc`'s chain, or the filesystem cannot
    hold the rest of the checkpoint (megatron's shard writer turns a failed write into a RuntimeError
    naming only the exception's type, so the errno is lost there; a full disk is the evidence left)."""
    if _no_space(exc):
        return True
    written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
    return shutil.disk_usage(root).free < need - written


def _no_space(exc: BaseException | None) -> bool:
    """Whether ENOSPC caused `exc`: itself, its causes, or a rank's failure inside
    torch.distributed.checkpoint's CheckpointException (rank -> (exception, traceback))."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            inner = (f[0] if isinstance(f, tuple) else f for f in failures.values())
            if any(isinstance(f, BaseException) and _no_space(f) for f in inner):
                return True
        exc = exc.__cause__ or exc.__context__
    return False

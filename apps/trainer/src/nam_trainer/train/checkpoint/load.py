"""Resuming: the checks against nam_checkpoint.json (layout, the files' checksums, geometry), then
model, optimizer, schedule and this rank's RNG as saved, or at another parallel layout the model and
optimizer resharded and the RNG derived from the seed and the step; `resume` falls back from a
damaged checkpoint to the previous good one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as torch_dist
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

from nam_runtime.megatron import (
    load_optimizer_state,
    optimizer_sharded_state_dict,
    prime_adam_state,
    restore_schedule,
)
from nam_trainer.train.checkpoint import checksums, files, marker, state
from nam_trainer.train.checkpoint.errors import CheckpointError, DamagedCheckpoint

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import MegatronModule

    from nam_plasticity import Plan

_log = logging.getLogger(__name__)

# What reading a damaged checkpoint raises: megatron's CheckpointingException and torch's errors are
# Exceptions; torch.distributed.checkpoint's CheckpointException (a missing shard file) is a BaseException.
_READ_ERRORS = (Exception, DcpCheckpointException)


def load_checkpoint(
    path: Path,
    model: list[MegatronModule],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    plan: Plan | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Restore model, optimizer, schedule, this rank's RNG and `plan`'s running state from the
    checkpoint at `path` (every rank calls this); returns the `state` given to save_checkpoint.
    Saved at another parallel layout (both with the distributed optimizer), model, optimizer and
    plasticity state are resharded to this one and the RNG is derived from `seed` (the run's) and
    the saved step instead (state.derive_rng); rank 0 logs one line saying so.
    A lever of the plan whose state the checkpoint lacks starts afresh, saved state of a lever the
    plan no longer has is ignored (a warning says which). Raises DamagedCheckpoint, before any
    tensor is read, when a file differs from the size and sha256 recorded at save."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = Path(path)
    meta = marker.read_marker(path)
    chunks = state.unwrap(model)
    change = marker.layout_change(path, meta["parallel"], marker.parallel_layout(chunks, optimizer))
    problem = checksums.problem(path, meta["files"])
    if problem is not None:
        raise DamagedCheckpoint(
            f"{path}: damaged checkpoint ({problem}); resume from an earlier checkpoint in the same directory"
        )
    try:
        sharded_metadata = dist_checkpointing.load_content_metadata(str(path))
    except _READ_ERRORS as exc:
        raise _damaged(path, exc) from exc
    sharded = state.model_sharded(chunks, sharded_metadata)
    marker.check_geometry(path, meta, marker.geometry(sharded))
    model_part = dict(sharded)
    prime_adam_state(optimizer)
    sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, sharded, sharded_metadata, is_loading=True)
    saved_levers = set(meta.get("plasticity_state", []))
    levers = [lever for lever in (plan.stateful() if plan is not None else ()) if lever in saved_levers]
    if levers:
        sharded["plasticity"] = plan.sharded_state_dict(chunks, optimizer, model_part, levers)
    if change is None:
        sharded["rng_state"] = state.rng_object(None)
    # saved, not loaded: the state of levers that are off, and the per-rank RNG of another layout
    ignored = (
        *(f"plasticity.{lever}." for lever in saved_levers - set(levers)),
        *(() if change is None else ("rng_state",)),
    )
    try:
        loaded, missing, unexpected = dist_checkpointing.load(
            sharded, str(path), strict=StrictHandling.RETURN_ALL
        )
        missing, unexpected = (
            [key for key in keys if not key.startswith(ignored)] for keys in (missing, unexpected)
        )
        if missing or unexpected:
            raise CheckpointingException(
                f"keys missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
    except _READ_ERRORS as exc:
        raise _damaged(path, exc) from exc
    _plasticity_notice(path, plan, saved_levers)
    if levers:
        plan.load_state_dict(loaded["plasticity"], chunks, optimizer, model_part)
    state.load_model(chunks, loaded)
    load_optimizer_state(optimizer, loaded["optimizer"])
    differing = restore_schedule(scheduler, loaded["scheduler"])
    if differing and torch_dist.get_rank() == 0:
        _log.warning(
            "%s: the learning-rate schedule continues as saved, not as configured: %s",
            path,
            ", ".join(differing),
        )
    if change is None:
        state.restore_rng(loaded["rng_state"])
        return loaded["state"]
    state.derive_rng(seed, meta["step"])
    if torch_dist.get_rank() == 0:
        _log.warning(
            "%s: saved at another parallel layout (%s): model and optimizer resharded to this one; the RNG "
            "restarts from training.seed %d and step %d (the saved per-rank states belong to the old layout)",
            path,
            change,
            seed,
            meta["step"],
        )
    return loaded["state"]


def _plasticity_notice(path: Path, plan: Plan | None, saved: set[str]) -> None:
    now = set(plan.stateful() if plan is not None else ())
    if now == saved or torch_dist.get_rank() != 0:
        return
    parts = []
    if now - saved:
        parts.append(f"{', '.join(sorted(now - saved))} start(s) without saved running state")
    if saved - now:
        parts.append(f"the saved state of {', '.join(sorted(saved - now))} is not used (off now)")
    _log.warning("%s: plasticity: %s", path, "; ".join(parts))


def _damaged(path: Path, exc: BaseException) -> DamagedCheckpoint:
    if isinstance(exc, DcpCheckpointException) and exc.failures:  # the first rank's error, not tracebacks
        exc = next(iter(exc.failures.values()))[0]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return DamagedCheckpoint(
        f"{path}: damaged checkpoint, dist_checkpointing could not read it ({type(exc).__name__}: {first if len(first) <= 300 else first[:300].rsplit(' ', 1)[0] + ' ...'}); "
        "resume from an earlier checkpoint in the same directory or delete this one"
    )


def resume(
    run_dir: Path,
    model: list[MegatronModule],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    check: Callable[[Path], None],
    log: Callable[[str], None],
    plan: Plan | None = None,
    seed: int = 0,
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest good checkpoint of `run_dir` (every rank calls this): find_latest's, else,
    when that one is damaged, the previous complete ones in turn. A damaged one is set aside as
    `damaged-step_N` (kept, never deleted; out of pruning's count, so keep_last keeps good ones) and
    `log` says so. `check(path)` runs before each load (the trainer's check of tokenizer and data);
    `seed` is load_checkpoint's.
    Returns (path, state), or None when `run_dir` has no checkpoint; raises when all are damaged."""
    damaged: list[str] = []
    for path in files.resume_candidates(run_dir):
        check(path)
        try:
            saved = load_checkpoint(path, model, optimizer, scheduler, plan, seed)
        except DamagedCheckpoint as exc:
            damaged.append(path.name)
            torch_dist.barrier()  # every rank has read it before it moves
            if torch_dist.get_rank() == 0:
                aside = files.set_aside(path)
                log(f"nam-train: {exc}; moved aside to {aside.name} (kept, not deleted)")
            torch_dist.barrier()
            continue
        if damaged:
            log(
                f"nam-train: {', '.join(damaged)} damaged: resuming from the previous good checkpoint, {path.name}"
            )
        return path, saved
    if damaged:
        raise CheckpointError(
            f"{Path(run_dir) / files.CHECKPOINTS}: every checkpoint is damaged ({', '.join(damaged)}, now named "
            f"{files.DAMAGED_PREFIX}*); restore them from a copy or start a new run directory (--checkpoint.dir)"
        )
    return None

"""Training checkpoints on megatron-core's dist_checkpointing, written so that a kill never hides
the last good one and a resumed run continues bit for bit.

    RUN_DIR/checkpoints/
        step_0000200/          complete: dist_checkpointing files + nam_checkpoint.json (written last)
        step_0000300/
        .tmp-step_0000400/     a write in progress (or killed): never loaded, removed by the next save
        latest                 "step_0000300": the checkpoint written last (atomic replace)

One checkpoint holds, per model chunk, megatron's sharded state dict (`model`, or `model0`,
`model1`, ... for virtual pipeline chunks); the optimizer's sharded state dict over them (the
distributed optimizer in its `dp_reshardable` format: each rank writes its own buffer shards, no
gather); the learning-rate schedule; the caller's `state`; and the RNG state of every rank
(python, numpy, torch CPU, CUDA, megatron's tensor-parallel tracker) as one sharded object per
rank. `nam_checkpoint.json` records step, parallel layout, the model geometry and its
fingerprint, and marks the checkpoint complete: it is written after every rank has finished, then
the directory is renamed into place.

Loading requires the same parallel layout (world, TP, PP, DP, EP, expert TP, CP, virtual
chunks) and the same model geometry; anything else is refused with a CheckpointError before a
tensor is read. Resharding (e.g. to another DP size) is not supported: the per-rank RNG states
have no meaning on another layout, so an exact resume could not be promised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import MegatronModule

__all__ = ["CheckpointError", "find_latest", "load_checkpoint", "save_checkpoint"]

_log = logging.getLogger(__name__)

FORMAT = "nam-trainer-checkpoint"
FORMAT_VERSION = 1
MARKER = "nam_checkpoint.json"  # metadata, written last: its presence means complete
LATEST = "latest"
CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"  # a write in progress or killed
OLD_PREFIX = ".old-"  # a checkpoint of the same step being replaced
_STEP_DIR = re.compile(r"step_(\d{7,})")
# megatron's sharded-state-dict options, stored in the checkpoint (content metadata) and reused
# when it is loaded. dp_reshardable: the distributed optimizer's buffers, each rank its own shard.
SHARDED_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
# OptimizerParamScheduler attributes that define the schedule: its state_dict() misses the last three
_SCHEDULE_KEYS = (
    "max_lr",
    "min_lr",
    "lr_warmup_steps",
    "lr_decay_steps",
    "lr_decay_style",
    "start_wd",
    "end_wd",
    "wd_incr_steps",
    "wd_incr_style",
    "num_steps",
    "init_lr",
    "wsd_decay_steps",
    "lr_wsd_decay_style",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded: which path, what is wrong, what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ------------------------------------------------------------------------------------------------
# Finding checkpoints
# ------------------------------------------------------------------------------------------------


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it is complete, else the complete
    checkpoint of the highest step; None when there is none. Temporary and incomplete directories
    (no completion marker) are never returned."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.parent == root and _STEP_DIR.fullmatch(named.name) and (named / MARKER).is_file():
            return named
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


# ------------------------------------------------------------------------------------------------
# What goes in: model and optimizer sharded state dicts, schedule, RNG, layout, geometry
# ------------------------------------------------------------------------------------------------


def _unwrap(model: list[MegatronModule]) -> list[MegatronModule]:
    """The model chunks without DDP / Float16Module wrappers, whose sharded keys carry no prefix."""
    from megatron.core.utils import unwrap_model

    if not isinstance(model, list) or not model:
        raise CheckpointError(f"model must be a non-empty list of model chunks, got {type(model).__name__}")
    return unwrap_model(model)


def _model_sharded(chunks: list[MegatronModule], metadata: dict[str, Any]) -> dict[str, Any]:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(chunks)}


def _inner_optimizers(optimizer: MegatronOptimizer) -> list[Any]:
    """The megatron optimizers inside `optimizer` (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _has_params(opt: Any) -> bool:
    inner = getattr(opt, "optimizer", None)
    return inner is not None and any(group["params"] for group in inner.param_groups)


def _optimizer_sharded(
    optimizer: MegatronOptimizer, model_sharded: dict[str, Any], metadata: dict[str, Any], is_loading: bool
) -> dict[str, Any]:
    """Each megatron optimizer's sharded state dict, in ChainedOptimizer's format (`chained_<i>.`
    key prefixes), leaving out optimizers without parameters on this rank (e.g. the expert
    optimizer on a pipeline stage without E layers): with torch's Adam megatron cannot build their
    state dict (it reads the step from per-parameter state, and there is none)."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedBase,
        ShardedObject,
    )
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = _inner_optimizers(optimizer)
    parts: dict[str, Any] = {}
    for index, opt in enumerate(subs):
        if not _has_params(opt):
            continue
        part = opt.sharded_state_dict(model_sharded, is_loading, metadata=metadata)
        if len(subs) > 1:
            add_prefix_for_sharding(part, f"chained_{index}.")
        if not isinstance(opt, DistributedOptimizer):
            # megatron's other optimizers leave their param groups as plain values, which
            # dist_checkpointing stores once, from rank 0; pipeline stages hold other groups
            sharded, plain = extract_matching_values(
                part, lambda v: isinstance(v, ShardedBase | LocalNonpersistentObject)
            )
            key = f"optimizer.chained_{index}.plain.rank_{torch_dist.get_rank()}"
            part = {"sharded": sharded, "plain": ShardedObject(key, plain, (1,), (0,), replica_id=0)}
        parts[f"chained_{index}"] = part
    return parts


def _load_optimizer(optimizer: MegatronOptimizer, loaded: dict[str, Any]) -> None:
    from megatron.core.dist_checkpointing.dict_utils import merge
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for index, opt in enumerate(_inner_optimizers(optimizer)):
        if not _has_params(opt):
            continue
        part = loaded[f"chained_{index}"]
        if not isinstance(opt, DistributedOptimizer):
            part = merge(part["sharded"], part["plain"])
        opt.load_state_dict(part)
    if len(_inner_optimizers(optimizer)) > 1:
        optimizer._synchronize_steps()  # what ChainedOptimizer.load_state_dict does last (TE's Adam)


def _uses_distributed_optimizer(optimizer: MegatronOptimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(opt, DistributedOptimizer) for opt in _inner_optimizers(optimizer))


def _prime_adam_state(optimizer: MegatronOptimizer) -> None:
    """Give every parameter of a torch Adam that has not stepped yet the state its first step
    would create (zeros, step 0): megatron reads the per-parameter `step` to build a state dict,
    for a save before the first step and for the fresh optimizer a load fills (torch's Adam, used
    where TE and Apex are absent, creates it only on its first step)."""
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                param_state = inner.state[param]
                if "step" not in param_state:
                    param_state.setdefault("exp_avg", torch.zeros_like(param))
                    param_state.setdefault("exp_avg_sq", torch.zeros_like(param))
                    if group.get("amsgrad"):
                        param_state.setdefault("max_exp_avg_sq", torch.zeros_like(param))
                    param_state["step"] = torch.tensor(0.0, dtype=torch.float32)


def _restore_adam_steps(optimizer: MegatronOptimizer) -> None:
    """Each parameter's Adam `step` as saved, in its own tensor. With torch's Adam, megatron's
    distributed optimizer saves the step in its param groups; its load then puts one shared step
    tensor in every parameter's state (torch's Adam would add 1 to it once per parameter) and the
    dp_reshardable loader overwrites it with the step the state had before the load."""
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            if "step" not in group:  # megatron's other optimizers restore per-parameter steps themselves
                continue
            step = float(group.pop("step"))  # torch's Adam keeps it per parameter only
            for param in group["params"]:
                inner.state[param]["step"] = torch.tensor(step, dtype=torch.float32)


def _schedule(scheduler: OptimizerParamScheduler) -> dict[str, Any]:
    return {key: getattr(scheduler, key) for key in _SCHEDULE_KEYS}


def _restore_schedule(path: Path, scheduler: OptimizerParamScheduler, saved: dict[str, Any]) -> None:
    """The saved schedule exactly: megatron's load_state_dict asserts or overrides values by flags,
    adds the saved step count to the current one and sets the weight decay before restoring it.
    Where this run was configured otherwise, the checkpoint wins and rank 0 logs what differed."""
    differing = [
        f"{key} {getattr(scheduler, key)!r} -> {saved[key]!r}"
        for key in _SCHEDULE_KEYS
        if key != "num_steps" and getattr(scheduler, key) != saved[key]
    ]
    if differing and torch_dist.get_rank() == 0:
        _log.warning(
            "%s: the learning-rate schedule continues as saved, not as configured: %s",
            path,
            ", ".join(differing),
        )
    for key in _SCHEDULE_KEYS:
        setattr(scheduler, key, saved[key])
    scheduler.step(0)  # lr and weight decay of every param group at the restored step


def _parallel_layout(chunks: list[MegatronModule], optimizer: MegatronOptimizer) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    return {
        "world_size": torch_dist.get_world_size(),
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel": ps.get_data_parallel_world_size(),
        "context_parallel": ps.get_context_parallel_world_size(),
        "expert_parallel": ps.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel": ps.get_expert_tensor_parallel_world_size(),
        "virtual_pipeline_chunks": len(chunks),
        "distributed_optimizer": _uses_distributed_optimizer(optimizer),
    }


def _geometry(model_sharded: dict[str, Any]) -> dict[str, str]:
    """Global shape and dtype of every model tensor, over all ranks (a collective): the same for
    the same model at any parallel layout."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    local: dict[str, str] = {}
    for value in nested_values(model_sharded):
        if isinstance(value, ShardedTensor):
            local[value.key] = f"{list(value.global_shape)} {str(value.dtype).removeprefix('torch.')}"
        elif isinstance(value, ShardedObject):
            local[value.key] = f"object {list(value.global_shape)}"
        elif hasattr(value, "key"):  # ShardedTensorFactory: one entry, its parts built on save
            local[value.key] = f"factory {str(value.data.dtype).removeprefix('torch.')}"
    gathered: list[dict[str, str]] = [{} for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather_object(gathered, local)
    merged: dict[str, str] = {}
    for part in gathered:
        merged.update(part)
    return dict(sorted(merged.items()))


def _fingerprint(geometry: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(geometry, sort_keys=True).encode()).hexdigest()


def _rng_states() -> dict[str, Any]:
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


def _restore_rng(states: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch_cpu"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    if states["megatron_tracker"] is not None:
        get_cuda_rng_tracker().set_states({k: _copy(v) for k, v in states["megatron_tracker"].items()})


def _copy(state: Any) -> Any:
    """A tracker state: a byte tensor (copied: the tracker replaces, never mutates, it), or with
    megatron's CUDA-graph-safe RNG a generator object, kept as it is."""
    return state.clone() if isinstance(state, torch.Tensor) else state


def _rng_object(states: dict[str, Any] | None) -> Any:
    """This rank's RNG states as its own entry of a world-sized sharded object."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    return ShardedObject("rng_state", states, (world,), (rank,), replica_id=0)


_PLAIN = (type(None), bool, int, float, str)


def _check_plain(value: Any, where: str) -> None:
    """`state` holds plain Python values (compared across ranks, stored in the common file)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"save_checkpoint: {where} has key {key!r}; state keys are strings")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise CheckpointError(
            f"save_checkpoint: {where} is a {type(value).__name__}; state holds plain values only "
            "(None, bool, int, float, str and lists/tuples/dicts of them): convert it, e.g. tensor.item()"
        )


def _check_same_on_all_ranks(state: dict[str, Any]) -> None:
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


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """`text` in `path`, all or nothing: a temporary file, fsynced, renamed over it."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_leftovers(root: Path) -> None:
    """Temporary directories of killed writes and replaced checkpoints: never complete, never loaded."""
    for entry in root.iterdir():
        if entry.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _prune(root: Path, keep_last: int, written: Path) -> None:
    """Keep the newest `keep_last` complete checkpoints by step, and always the one just written."""
    complete = _complete_checkpoints(root)
    for _, path in complete[: max(0, len(complete) - keep_last)]:
        if path != written:
            # the marker goes first: a kill mid-removal leaves an incomplete directory, never loaded
            (path / MARKER).unlink()
            shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: list[MegatronModule],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write RUN_DIR/checkpoints/step_<step> (every rank calls this with the same `step` and
    `state`); returns its path. Written under a temporary name and renamed once every rank has
    finished; then `latest` names it and only the newest `keep_last` complete checkpoints remain."""
    from megatron.core import dist_checkpointing

    if keep_last < 1:
        raise CheckpointError(f"save_checkpoint: keep_last = {keep_last}; keep at least 1 checkpoint")
    if step < 0:
        raise CheckpointError(f"save_checkpoint: step = {step}; steps are >= 0")
    if not isinstance(state, dict):
        raise CheckpointError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")
    rng = _rng_states()  # before anything below could draw a random number
    chunks = _unwrap(model)
    _prime_adam_state(optimizer)  # a save before the first step: the state Adam would create
    _check_same_on_all_ranks(state)
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    rank = torch_dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        tmp.mkdir()
    torch_dist.barrier()

    sharded = _model_sharded(chunks, SHARDED_METADATA)
    geometry = _geometry(sharded)
    sharded["optimizer"] = _optimizer_sharded(optimizer, sharded, SHARDED_METADATA, is_loading=False)
    sharded["scheduler"] = _schedule(scheduler)
    sharded["state"] = state
    sharded["rng_state"] = _rng_object(rng)
    dist_checkpointing.save(sharded, str(tmp), content_metadata=dict(SHARDED_METADATA))
    torch_dist.barrier()  # every rank's shards are on disk

    if rank == 0:
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "parallel": _parallel_layout(chunks, optimizer),
            "optimizer_sharding": SHARDED_METADATA["distrib_optim_sharding_type"],
            "model_fingerprint": _fingerprint(geometry),
            "versions": {"torch": torch.__version__, "megatron_core": _megatron_version()},
            "geometry": geometry,
        }
        _write_atomic(tmp / MARKER, json.dumps(meta, indent=1) + "\n")
        if final.exists():  # the same step again (e.g. a final save right after an interval save)
            final.rename(root / f"{OLD_PREFIX}{final.name}")
        tmp.rename(final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, final.name + "\n")
        _remove_leftovers(root)
        _prune(root, keep_last, final)
    torch_dist.barrier()  # no rank returns before the checkpoint is visible
    return final


def _megatron_version() -> str:
    import megatron.core

    return str(megatron.core.__version__)


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------


def _read_marker(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such checkpoint directory; pass one from find_latest(run_dir) "
            "or start without resuming"
        )
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{path}: incomplete checkpoint ({MARKER} missing: its write did not finish); "
            "resume from find_latest(run_dir), which skips it, or delete the directory"
        )
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{marker}: unreadable checkpoint metadata ({exc}); resume from an earlier checkpoint"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(
            f"{marker}: not a {FORMAT} version {FORMAT_VERSION} checkpoint (found {found}); "
            "this nam-trainer cannot load it"
        )
    return meta


def _check_layout(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    differing = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if differing:
        what = ", ".join(f"{key} {was} -> {now}" for key, (was, now) in differing.items())
        raise CheckpointError(
            f"{path}: saved with another parallel layout or optimizer ({what}); resume with the saved sizes "
            f"{saved}: nam-trainer does not reshard checkpoints"
        )


def _check_geometry(path: Path, meta: dict[str, Any], geometry: dict[str, str]) -> None:
    if meta.get("model_fingerprint") == _fingerprint(geometry):
        return
    saved: dict[str, str] = meta.get("geometry", {})
    changed = [
        f"{k}: {saved[k]} -> {geometry[k]}" for k in saved.keys() & geometry.keys() if saved[k] != geometry[k]
    ]
    only_saved = sorted(saved.keys() - geometry.keys())
    only_model = sorted(geometry.keys() - saved.keys())
    details = []
    if changed:
        details.append(
            f"{len(changed)} tensors changed shape or dtype, e.g. {'; '.join(sorted(changed)[:3])}"
        )
    if only_saved:
        details.append(f"{len(only_saved)} only in the checkpoint, e.g. {', '.join(only_saved[:3])}")
    if only_model:
        details.append(f"{len(only_model)} only in this model, e.g. {', '.join(only_model[:3])}")
    raise CheckpointError(
        f"{path}: the checkpoint holds another model geometry ({'; '.join(details) or 'fingerprint differs'}); "
        "build the model with the configuration the checkpoint was saved with, or start a new run directory"
    )


def load_checkpoint(
    path: Path,
    model: list[MegatronModule],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
) -> dict[str, Any]:
    """Restore model, optimizer, schedule and this rank's RNG from the checkpoint at `path` (every
    rank calls this); returns the `state` given to save_checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = Path(path)
    meta = _read_marker(path)
    chunks = _unwrap(model)
    _check_layout(path, meta["parallel"], _parallel_layout(chunks, optimizer))
    try:
        sharded_metadata = dist_checkpointing.load_content_metadata(str(path))
    except _READ_ERRORS as exc:
        raise _damaged(path, exc) from exc
    sharded = _model_sharded(chunks, sharded_metadata)
    _check_geometry(path, meta, _geometry(sharded))
    _prime_adam_state(optimizer)
    sharded["optimizer"] = _optimizer_sharded(optimizer, sharded, sharded_metadata, is_loading=True)
    sharded["rng_state"] = _rng_object(None)
    try:
        loaded = dist_checkpointing.load(sharded, str(path), strict=StrictHandling.RAISE_ALL)
    except _READ_ERRORS as exc:
        raise _damaged(path, exc) from exc
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    with (
        torch.no_grad()
    ):  # dp_reshardable's loader copies into main params (views of fp32 weights) without it
        _load_optimizer(optimizer, loaded["optimizer"])
    _restore_adam_steps(optimizer)
    _restore_schedule(path, scheduler, loaded["scheduler"])
    _restore_rng(loaded["rng_state"])
    return loaded["state"]


# What reading a damaged checkpoint raises: megatron's CheckpointingException and torch's errors are
# Exceptions; torch.distributed.checkpoint's CheckpointException (a missing shard file) is a BaseException.
_READ_ERRORS = (Exception, DcpCheckpointException)


def _damaged(path: Path, exc: BaseException) -> CheckpointError:
    if isinstance(exc, DcpCheckpointException) and exc.failures:  # the first rank's error, not tracebacks
        exc = next(iter(exc.failures.values()))[0]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return CheckpointError(
        f"{path}: damaged checkpoint, dist_checkpointing could not read it ({type(exc).__name__}: {first[:300]}); "
        "resume from an earlier checkpoint in the same directory or delete this one"
    )

"""nam_checkpoint.json: what a checkpoint was saved from (format, step, parallel layout, model
geometry and its fingerprint, what the weights were trained on, versions) with the size and sha256
of each of its files, and the checks a load makes against it before a tensor is read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist

from nam_runtime.megatron import inner_optimizers
from nam_trainer.train.checkpoint.errors import CheckpointError
from nam_trainer.train.checkpoint.files import MARKER

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.transformer.module import MegatronModule

FORMAT = "nam-trainer-checkpoint"
FORMAT_VERSION = 3  # 2: the files' checksums and `trained_on`; 3: the optimizer fully_reshardable


def parallel_layout(chunks: list[MegatronModule], optimizer: MegatronOptimizer) -> dict[str, Any]:
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


def _uses_distributed_optimizer(optimizer: MegatronOptimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(opt, DistributedOptimizer) for opt in inner_optimizers(optimizer))


def geometry(model_sharded: dict[str, Any]) -> dict[str, str]:
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


def marker_text(
    step: int,
    layout: dict[str, Any],
    optimizer_sharding: str,
    geometry: dict[str, str],
    trained_on: dict[str, Any] | None,
    files: dict[str, dict[str, Any]],
    config: dict[str, Any] | None = None,
    plasticity: tuple[str, ...] = (),
) -> str:
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "parallel": layout,
        "optimizer_sharding": optimizer_sharding,
        "model_fingerprint": _fingerprint(geometry),
        "trained_on": trained_on,
        "config": config,
        "plasticity_state": list(plasticity),  # the levers whose running state is saved
        "versions": {"torch": torch.__version__, "megatron_core": _megatron_version()},
        "files": files,
        "geometry": geometry,
    }
    return json.dumps(meta, indent=1) + "\n"


def _megatron_version() -> str:
    import megatron.core

    return str(megatron.core.__version__)


def read_marker(path: Path) -> dict[str, Any]:
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
            "this nam-trainer cannot load it (version 1 predates the checksums and the record of the "
            "tokenizer and data, version 2 the optimizer state in a form any parallel layout loads): resume it with the nam-trainer that wrote it, or start a new run "
            "directory (--checkpoint.dir)"
        )
    return meta


def layout_change(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between the parallel layout the checkpoint at `path` was saved with and this
    run's ("tensor_parallel 1 -> 2, ..."), None when nothing does. Model and optimizer state load at
    any layout, but only with the distributed optimizer on both sides: the plain one stores its
    param groups per rank."""
    differing = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if not differing:
        return None
    what = ", ".join(f"{key} {was} -> {now}" for key, (was, now) in differing.items())
    if "distributed_optimizer" in differing or not current["distributed_optimizer"]:
        raise CheckpointError(
            f"{path}: saved with another parallel layout ({what}); a checkpoint loads at another layout only "
            "between runs with parallel.distributed_optimizer = true, so resume with the saved sizes and "
            f"optimizer {saved}"
        )
    return what


def check_geometry(path: Path, meta: dict[str, Any], geometry: dict[str, str]) -> None:
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


def check_trained_on(path: Path, current: dict[str, Any], allow_new_data: bool) -> str | None:
    """Refuse to resume the checkpoint at `path` if its weights were trained with another tokenizer
    (always: their embeddings index other token ids) or on other data (unless `allow_new_data`);
    returns what changed when the data did and that is allowed, else None. Reads the marker only, so
    it can run before the model is built. `current` is nam_trainer.data.trained_on's: {"tokenizer":
    {sha256, vocab_size, eos_id, pad_id, path}, "data": {"rows": the packed rows' key inputs, "sources"}}."""
    saved = read_marker(path).get("trained_on")
    if saved is None:
        raise CheckpointError(
            f"{path}: the checkpoint records no tokenizer or data (saved without trained_on), so a resume "
            "cannot tell whether they changed; start a new run directory (--checkpoint.dir)"
        )
    was, now = saved["tokenizer"], current["tokenizer"]
    if _compared(was) != _compared(now):
        raise CheckpointError(
            f"{path}: trained with another tokenizer (sha256 {was['sha256'][:12]} -> {now['sha256'][:12]}, "
            f"{was['vocab_size']} -> {now['vocab_size']} tokens, was {was['path']}): its weights index other "
            f'token ids, so it is never resumed with this one; set tokenizer.path = "{was["path"]}" if that '
            "file is unchanged, or start a new run directory (--checkpoint.dir)"
        )
    rows_was, rows_now = saved["data"]["rows"], current["data"]["rows"]
    if rows_was == rows_now:
        return None
    changed = ", ".join(
        "the documents differ"  # fingerprints of every source's splits
        if key == "sources"
        else f"{key} {rows_was.get(key)} -> {rows_now.get(key)}"
        for key in sorted(rows_was.keys() | rows_now.keys())
        if rows_was.get(key) != rows_now.get(key)
    )
    what = f"{changed}; sources {saved['data']['sources']} -> {current['data']['sources']}"
    if allow_new_data:
        return f"{path}: resuming on other data than it was trained on ({what}): checkpoint.allow_new_data = true"
    raise CheckpointError(
        f"{path}: trained on other data ({what}); to continue these weights on the new data on purpose "
        "(fine-tuning with the same tokenizer) set checkpoint.allow_new_data = true, otherwise restore the "
        "data settings or start a new run directory (--checkpoint.dir)"
    )


def _compared(tokenizer: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer's identity: all but where its file was."""
    return {key: value for key, value in tokenizer.items() if key != "path"}

"""Training checkpoints on megatron-core's dist_checkpointing, written so that a kill never hides
the last good one and a resumed run continues bit for bit.

    RUN_DIR/checkpoints/
        step_0000200/          complete: dist_checkpointing files + nam_checkpoint.json (written last)
        step_0000300/
        .tmp-step_0000400/     a write in progress (or killed): never loaded, removed by the next save
        damaged-step_0000100/  found damaged by a resume: kept for inspection, never loaded or pruned
        latest                 "step_0000300": the checkpoint written last (atomic replace)

One checkpoint holds, per model chunk, megatron's sharded state dict (`model`, or `model0`,
`model1`, ... for virtual pipeline chunks); the optimizer's sharded state dict over them (the
distributed optimizer in megatron's `fully_reshardable` format: per model parameter, gathered over
data-parallel ranks on save); the learning-rate schedule; the plasticity plan's running state (`plasticity`, sharded as
the parameters it belongs to; the marker lists its levers); the caller's `state`; and the RNG state of every rank
(python, numpy, torch CPU, CUDA, megatron's tensor-parallel tracker) as one sharded object per
rank. `nam_checkpoint.json` records step, parallel layout, the model geometry and its
fingerprint, what the weights were trained on (tokenizer, data), the size and sha256 of every file,
and marks the checkpoint complete: it is written after every rank has finished, then the directory
is renamed into place. A save first compares the free space with the checkpoint's tensor bytes; a
save that fails removes its temporary directory, and ENOSPC becomes DiskFull.

Loading requires the same model geometry and intact files (the recorded checksums). At the same
parallel layout (world, TP, PP, DP, EP, expert TP, CP, virtual chunks) it restores everything as
saved; at another one, with the distributed optimizer on both sides, it reshards model, optimizer
and plasticity state and derives the RNG from the seed and the step (one warning line); anything
else is refused with a CheckpointError before a tensor is read. `resume` loads the newest good
checkpoint, setting damaged ones aside; `check_trained_on` refuses a changed tokenizer, and changed
data unless allowed.

The parts: `files` (the layout on disk: names, atomic writes, `latest`, pruning), `marker` (what
nam_checkpoint.json records and the checks against it), `checksums` (the files' sizes and sha256),
`state` (what goes in: model, optimizer,
schedule, RNG, the caller's state), `save` and `load`.
"""

from nam_trainer.train.checkpoint.errors import CheckpointError, DamagedCheckpoint, DiskFull
from nam_trainer.train.checkpoint.files import MARKER, find_latest
from nam_trainer.train.checkpoint.load import load_checkpoint, resume
from nam_trainer.train.checkpoint.marker import check_trained_on
from nam_trainer.train.checkpoint.save import save_checkpoint

__all__ = [
    "MARKER",
    "CheckpointError",
    "DamagedCheckpoint",
    "DiskFull",
    "check_trained_on",
    "find_latest",
    "load_checkpoint",
    "resume",
    "save_checkpoint",
]

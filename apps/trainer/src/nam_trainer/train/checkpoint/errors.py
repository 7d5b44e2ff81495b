"""The errors of the checkpoint package."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded: which path, what is wrong, what to do."""


class DamagedCheckpoint(CheckpointError):
    """A complete checkpoint whose files do not match the checksums written with its marker, or that
    dist_checkpointing cannot read: a resume falls back to the previous good checkpoint."""


class DiskFull(CheckpointError):
    """A save that found or ran out of disk space (ENOSPC); its temporary folder is removed and the
    last good checkpoint is intact."""

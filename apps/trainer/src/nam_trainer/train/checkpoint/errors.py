"""The one error of the checkpoint package."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded: which path, what is wrong, what to do."""

"""nam-train: NAM56R training end to end on megatron-core."""

__version__ = "0.1.0"

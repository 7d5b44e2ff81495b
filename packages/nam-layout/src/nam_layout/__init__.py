"""The NAM pattern contract: grammar, tiling, families, validation, pipeline stages, megatron translation."""

__version__ = "0.1.0"

"""From a NAM layout to megatron-core module specs and a model."""

__version__ = "0.1.0"

"""FIRE, DASH, ReDo and STP plasticity interventions for tensor-parallel megatron-core models."""

__version__ = "0.1.0"

"""From a NAM layout to megatron-core module specs and a model.

Light at import: the config, presets, the parameter formula and the memory estimate need no
megatron; the builders import it when used.
"""

from nam_spec.accounting import letter_params, model_flops_per_token, model_params
from nam_spec.config import (
    AttentionConfig,
    EmbeddingConfig,
    M2RNNConfig,
    MambaConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    SpecConfigError,
)
from nam_spec.letters import LETTERS
from nam_spec.memory import MemoryEstimate, MemoryPlan, memory_estimate, memory_plan
from nam_spec.presets import PRESETS, preset
from nam_spec.validation import environment_problems, problems, validate

__version__ = "0.1.0"

__all__ = [
    "LETTERS",
    "PRESETS",
    "AttentionConfig",
    "EmbeddingConfig",
    "M2RNNConfig",
    "MambaConfig",
    "MemoryEstimate",
    "MemoryPlan",
    "MoEConfig",
    "ModelConfig",
    "ParallelConfig",
    "SpecConfigError",
    "build_model",
    "describe",
    "document_boundaries",
    "environment_problems",
    "layer_specs",
    "letter_params",
    "memory_estimate",
    "memory_plan",
    "model_flops_per_token",
    "model_params",
    "preset",
    "problems",
    "validate",
]


def __getattr__(name: str) -> object:  # megatron-facing names load on first use
    if name == "build_model":
        from nam_spec.model import build_model

        return build_model
    if name == "describe":
        from nam_spec.description import describe

        return describe
    if name == "document_boundaries":
        from nam_spec.documents import document_boundaries

        return document_boundaries
    if name == "layer_specs":
        from nam_spec.specs import layer_specs

        return layer_specs
    raise AttributeError(f"module 'nam_spec' has no attribute {name!r}")

"""Per-letter layer specs as data: one megatron ``ModuleSpec`` tree per letter and backend, each
declared by its letter's module in :mod:`nam_spec.letters`."""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from nam_spec.backends import Backend
from nam_spec.config import ModelConfig
from nam_spec.letters import LETTERS


def layer_specs(b: Backend, config: ModelConfig) -> dict[str, ModuleSpec]:
    """letter -> ModuleSpec for every letter nam-spec builds."""
    return {key: block.spec(b, config) for key, block in LETTERS.items()}

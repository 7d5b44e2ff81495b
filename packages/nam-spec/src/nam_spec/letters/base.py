"""What nam-spec knows about one letter, in one place: the ``Letter`` every letter module subclasses.

A letter module declares, for its layer: the megatron ``ModuleSpec`` per backend, the module a
built layer computes with (for describe), its parameters and the FLOPs the weight formula does
not cover, the activation bytes it keeps for backward under each recompute policy, the checks
its geometry must pass, and what "selective" recomputation recomputes. Everything else in
nam-spec (specs, accounting, memory, validation, describe, the CLI) and nam-train read these
through :data:`nam_spec.letters.LETTERS`; adding a letter or a variant touches only its module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from nam_spec.config import ModelConfig, ParallelConfig, Recompute

if TYPE_CHECKING:
    import torch
    from megatron.core.transformer.spec_utils import ModuleSpec

    from nam_spec.backends import Backend
    from nam_spec.decode.cores import DecodeContext

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class LetterParams:
    """One layer's parameters (whole model: all tensor-parallel shards together)."""

    total: int
    active: int  # as a token sees them: routed experts at top_k / num_experts
    matmul_active: int  # active weights of matrix multiplies (what the FLOP formula counts)


def activation_bytes(config: ModelConfig) -> int:
    """Bytes per activation element: the parameter dtype (megatron trains in it)."""
    return BYTES[config.dtype_name]


def norm_bytes(config: ModelConfig, tokens: int) -> int:
    """A pre-norm's saved tensors: its input, the fp32 rstd (F.rms_norm) and its output (the next
    linear's input). Every layer has one; under "full" recompute only the input stays."""
    a = activation_bytes(config)
    return 2 * a * tokens * config.hidden_size + 4 * tokens


class Letter:
    """One letter of the pattern grammar as nam-spec builds it. Subclasses set the class
    attributes and implement the methods; instances are stateless."""

    letter: ClassVar[str]
    name: ClassVar[str]  # what the block is, for tables and messages
    # what "selective" recomputes: megatron's ``recompute_modules`` for layers megatron runs (A, E,
    # '-'), or the mixer core that our adapters checkpoint themselves (M, R)
    selective: ClassVar[tuple[str, ...]] = ()
    megatron_recompute: ClassVar[bool] = True  # selective goes through megatron's recompute_modules

    def spec(self, backend: Backend, config: ModelConfig) -> ModuleSpec:
        raise NotImplementedError

    def core(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The module of a built layer that computes what the letter stands for."""
        raise NotImplementedError

    def decode_core(self, core: torch.nn.Module, context: DecodeContext) -> torch.nn.Module | None:
        """For incremental decoding (nam_spec.decode): a stand-in for ``core(layer)`` that keeps
        what the next token needs of the past, or None where the layer needs nothing of it."""
        return None

    def spec_core(self, spec: ModuleSpec) -> Any:
        """The class (or builder) a spec names for that computation; TE's may be placeholders."""
        raise NotImplementedError

    def params(self, config: ModelConfig) -> LetterParams:
        raise NotImplementedError

    def summary(self, config: ModelConfig) -> str:
        """The letter's geometry in a few words, for one-line model descriptions."""
        raise NotImplementedError

    def extra_flops_per_token(self, config: ModelConfig) -> float:
        """Forward+backward FLOPs per token beyond 6 x matmul weights (DESIGN.md's formula)."""
        return 0.0

    def activations(self, config: ModelConfig, micro_batch: int, policy: Recompute) -> int:
        """Bytes one layer keeps for backward at ``seq_length`` x ``micro_batch`` under ``policy``,
        on the local backend's CUDA paths. The layer input is always kept (by its norm, or by the
        checkpoint under "full")."""
        tokens = config.seq_length * micro_batch
        if policy == "full":
            return activation_bytes(config) * tokens * config.hidden_size
        return norm_bytes(config, tokens) + self.inner_activations(config, tokens, micro_batch, policy)

    def inner_activations(self, config: ModelConfig, tokens: int, micro_batch: int, policy: Recompute) -> int:
        """What the layer saves beyond its pre-norm (``policy`` is "none" or "selective")."""
        raise NotImplementedError

    def problems(self, config: ModelConfig, parallel: ParallelConfig) -> list[str]:
        """What in ``config`` this letter cannot build, each naming the key and what is accepted."""
        return []

    def transformer_config_fields(self, config: ModelConfig, parallel: ParallelConfig) -> dict[str, Any]:
        """megatron ``TransformerConfig`` fields a model with this letter needs."""
        return {}

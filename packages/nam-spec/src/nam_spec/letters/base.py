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
    """One layer's parameters (whole model: all tensor-parallel shards together), and how megatron
    places them: ``tensor_split`` of them are split evenly over the tensor-parallel ranks (column-
    and row-parallel weights, the per-head parameters of the local heads), ``expert`` are the routed
    experts, split over expert-parallel x expert-tensor-parallel ranks; the rest (norms, router,
    shared q/k head) is replicated on every rank."""

    total: int
    active: int  # as a token sees them: routed experts at top_k / num_experts
    matmul_active: int  # active weights of matrix multiplies (what the FLOP formula counts)
    tensor_split: int
    expert: int

    def local(self, parallel: ParallelConfig) -> tuple[int, int]:
        """(dense, expert) parameters of this layer on one rank; the letter's checks make the
        splits exact."""
        replicated = self.total - self.tensor_split - self.expert
        return (
            replicated + self.tensor_split // parallel.tensor,
            self.expert // (parallel.expert * parallel.expert_tensor_size),
        )


def activation_bytes(config: ModelConfig) -> int:
    """Bytes per activation element: the parameter dtype (megatron trains in it)."""
    return BYTES[config.dtype_name]


def sequence_shard(tokens: int, parallel: ParallelConfig) -> int:
    """The tokens of ``tokens`` one tensor-parallel rank holds in [s, b, h] tensors between the
    parallel linears: a 1/tp shard of the sequence under sequence parallelism, else all."""
    return tokens // parallel.tensor if parallel.sequence_parallel else tokens


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
    # CUDA graphs per layer (nam_spec.graphs, ModelConfig.cuda_graphs): whether the layer captures,
    # and whether it reads the micro-batch's segment ids (then a static input of its graph)
    graphable: ClassVar[bool] = False
    reads_segments: ClassVar[bool] = False

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

    def activations(
        self,
        config: ModelConfig,
        micro_batch: int,
        policy: Recompute,
        parallel: ParallelConfig | None = None,
    ) -> int:
        """Bytes one layer keeps for backward on one rank at ``seq_length`` x ``micro_batch`` under
        ``policy``, on the local backend's CUDA paths. The layer input is always kept (by its norm,
        or by the checkpoint under "full"); under sequence parallelism it is the rank's sequence
        shard."""
        parallel = parallel or ParallelConfig()
        tokens = config.seq_length * micro_batch
        local = sequence_shard(tokens, parallel)
        if policy == "full":
            return activation_bytes(config) * local * config.hidden_size
        return norm_bytes(config, local) + self.inner_activations(
            config, tokens, micro_batch, policy, parallel
        )

    def inner_activations(
        self, config: ModelConfig, tokens: int, micro_batch: int, policy: Recompute, parallel: ParallelConfig
    ) -> int:
        """What the layer saves beyond its pre-norm (``policy`` is "none" or "selective") on one
        tensor-parallel rank: ``tokens`` is the whole sequence x micro-batch, of which the rank
        holds what :func:`sequence_shard` says between the parallel linears."""
        raise NotImplementedError

    def problems(self, config: ModelConfig, parallel: ParallelConfig) -> list[str]:
        """What in ``config`` this letter cannot build, each naming the key and what is accepted."""
        return []

    def graph_problems(self, config: ModelConfig) -> list[str]:
        """What in ``config`` stops a graphable layer of this letter from capturing."""
        return []

    def transformer_config_fields(self, config: ModelConfig, parallel: ParallelConfig) -> dict[str, Any]:
        """megatron ``TransformerConfig`` fields a model with this letter needs."""
        return {}

    def layer_config(self, config: ModelConfig) -> tuple[type, dict[str, Any]]:
        """The megatron config class of this letter's own layers and the fields it adds there (a
        variant's config subclass, e.g. MLA's); the model's other layers never see them."""
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig, {}

"""The model definition as data: which family, the geometry per letter, the embedding extras, the
backend, the precision and the recomputation; and, apart from it, how the model is split over GPUs.

These dataclasses are the only model schema of the project: nam-train's ``[model]`` section is
:class:`ModelConfig` field for field (nested tables such as ``[model.moe]``), and its ``[parallel]``
section extends :class:`ParallelConfig`. Everything here is plain Python; the checks live in
:mod:`nam_spec.validation` (one entry point, every problem at once) and megatron-core's
``TransformerConfig`` is made only in :mod:`nam_spec.transformer_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from nam_embed import NgramHashConfig, StructureConfig
    from nam_layout import Layout

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_POLICIES: tuple[str, ...] = ("none", "selective", "full")
PARAMS_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
BACKENDS: tuple[str, ...] = ("local", "te")


class SpecConfigError(ValueError):
    """A configuration that cannot build the requested layout; raised before any allocation."""


@dataclass(frozen=True)
class AttentionConfig:
    """The attention layers: A (causal GQA self-attention with RoPE) and its variant L (multi-latent
    attention, DeepSeek-V2's MLA as megatron-core builds it), which share heads and RoPE base."""

    num_heads: int = 56
    num_kv_heads: int = 8
    rope_base: float = 10000.0
    # L only: ranks of the query and key/value latents, per-head
    # dimensions of the non-rotary and rotary query/key parts and of the value
    q_lora_rank: int = 64
    kv_lora_rank: int = 64
    qk_head_dim: int = 64
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 64


@dataclass(frozen=True)
class MoEConfig:
    """The E layers: router, routed experts and the optional shared expert."""

    num_experts: int = 16
    top_k: int = 4
    ffn_hidden_size: int = 896
    shared_ffn_hidden_size: int = 1024  # 0: no shared expert
    score_function: Literal["softmax", "sigmoid"] = "sigmoid"
    expert_bias: bool = True  # aux-loss-free balancing bias (updated by megatron's finalize step)
    aux_loss_coeff: float = 1e-2
    load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    # megatron's "alltoall" / "allgather", or nam-spec's "local" (one rank's experts, no host sync)
    dispatcher: Literal["alltoall", "allgather", "local"] = "alltoall"


@dataclass(frozen=True)
class MambaConfig:
    """The M layers: nam-mixers' Mamba-2 SSD mixer, or its Mamba-3 SISO mixer (``kind``)."""

    kind: Literal["mamba2", "mamba3"] = "mamba2"
    d_state: int = 64
    head_dim: int = 64
    ngroups: int = 8
    expand: int = 2
    conv_width: int = 4  # Mamba-2 only: Mamba-3 has no conv
    chunk_size: int = 128
    # nam_mixers' execution path: "fused" / "split" for Mamba-2, "triton" for Mamba-3
    path: Literal["auto", "fused", "split", "triton", "reference"] = "auto"
    rope_fraction: float = 0.5  # Mamba-3: the share of d_state rotated (0.5 or 1.0)
    A_floor: float = 1e-4  # Mamba-3: A = min(-softplus(.), -A_floor)


@dataclass(frozen=True)
class M2RNNConfig:
    """The R layers: M2RNN value heads (split across tensor-parallel ranks) and shared q/k heads."""

    num_heads: int = 44
    head_dim_v: int = 16
    head_dim_k: int = 64
    num_qk_heads: int = 1
    conv_width: int = 4
    path: Literal["auto", "triton", "reference"] = "auto"  # nam_mixers' execution path


@dataclass(frozen=True)
class EmbeddingConfig:
    """nam-embed's extras beside the word embedding: n-gram hash tables and code-structure channels
    (the structure channels need structure ids in every batch, e.g. nam-train's C++ extractor)."""

    ngram: bool = False
    ngram_orders: tuple[int, ...] = (2, 3)
    ngram_heads: int = 8
    ngram_table_size: int = 500_000
    ngram_dim: int = 16
    structure: bool = False
    structure_bottleneck: int = 64

    def ngram_config(self) -> NgramHashConfig | None:
        from nam_embed import NgramHashConfig

        if not self.ngram:
            return None
        return NgramHashConfig(
            orders=tuple(self.ngram_orders),
            heads=self.ngram_heads,
            table_size=self.ngram_table_size,
            dim=self.ngram_dim,
        )

    def structure_config(self) -> StructureConfig | None:
        from nam_embed import StructureConfig

        return StructureConfig(bottleneck=self.structure_bottleneck) if self.structure else None


@dataclass(frozen=True)
class ModelConfig:
    """One NAM model. Defaults are the NAM56R reference geometry of DESIGN.md."""

    family: str = "NAM56R"  # a nam-layout family: its pattern and depth decide what gets built
    families_file: str = ""  # a nam-layout TOML file of extra families ("" = built-ins only)
    hidden_size: int = 3584
    vocab_size: int = 65536
    seq_length: int = 4096
    ffn_hidden_size: int = 4 * 3584  # the dense '-' layer (SwiGLU)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    m2rnn: M2RNNConfig = field(default_factory=M2RNNConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    untie_output: bool = True
    # "local" (our modules, runs everywhere) or "te" (Transformer Engine: structurally tested only)
    backend: Literal["local", "te"] = "local"
    # one policy for every letter, or letter -> policy (absent letters: none)
    recompute: Recompute | Mapping[str, Recompute] = "none"
    params_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, else fp32
    # weight gradients accumulated straight into megatron DDP's fp32 main_grad (megatron's
    # gradient_accumulation_fusion; nam_runtime.wgrad in place of apex): no separate add per weight
    gradient_accumulation_fusion: bool = True
    # multi-token prediction (nam_spec.mtp): depths after the main head, 0 = off; their mean loss
    # joins the main loss times this weight (megatron's mtp_loss_scaling_factor, its default 0.1)
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.1
    # the output layer and its cross entropy fused over this many tokens at a time
    # (nam_spec.cross_entropy: a micro-batch's logits never exist at once); 0 = megatron's path.
    # Off by default: it saves memory (6.0 -> 3.6 GiB at 16384 tokens, vocab 65536) but its
    # backward recomputes the logits, 39 -> 54 ms on an H100 (bench/RESULTS.md, cross_entropy)
    loss_chunk_tokens: int = 0
    # letters whose layers train as CUDA graphs, one per layer, captured after two eager calls
    # (nam_spec.graphs; the letters that can: nam_spec.letters.GRAPH_LETTERS); "" = none
    cuda_graphs: str = ""

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention.num_heads

    @property
    def dtype_name(self) -> str:
        """``params_dtype`` with ``auto`` decided by this machine: bfloat16 with CUDA, else float32."""
        if self.params_dtype != "auto":
            return self.params_dtype
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)

    def recompute_for(self, letter: str) -> Recompute:
        if isinstance(self.recompute, str):
            return self.recompute
        return self.recompute.get(letter, "none")

    def layout(self) -> Layout:
        """The family's layout: the one place a family name becomes the layers to build."""
        from nam_layout import BUILTIN, FamilyError, FamilyRegistry, LayoutError, PatternError

        registry = FamilyRegistry(BUILTIN)
        try:
            if self.families_file:
                registry.load_toml(self.families_file)
            return registry.get(self.family).layout()
        except (FamilyError, LayoutError, PatternError, OSError) as err:
            where = f" (families file {self.families_file!r})" if self.families_file else ""
            raise SpecConfigError(f"model.family = {self.family!r}{where}: {err}") from err


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split: megatron-core's tensor, pipeline (and virtual), expert and expert
    tensor sizes, and sequence parallelism. The data-parallel size is what the world leaves."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    expert: int = 1
    expert_tensor: int = 0  # 0: megatron's default, the tensor-parallel size
    sequence_parallel: bool = False

    @property
    def expert_tensor_size(self) -> int:
        return self.expert_tensor or self.tensor

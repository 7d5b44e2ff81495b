"""Model configuration as data: geometry per letter, parallel sizes, backend, recomputation.

Everything here is plain Python and is checked by :func:`validate` against the layout before a
single tensor is allocated. :meth:`ModelConfig.transformer_config` is the only place that turns it
into megatron-core's ``TransformerConfig``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from nam_layout import Layout

if TYPE_CHECKING:
    import torch
    from megatron.core.transformer import TransformerConfig

Recompute = Literal["none", "selective", "full"]
SPEC_LETTERS = "AEMR-"  # the letters nam-spec builds; DESIGN.md "The letters"


class SpecConfigError(ValueError):
    """A configuration that cannot build the requested layout; raised before any allocation."""


@dataclass(frozen=True)
class AttentionConfig:
    num_heads: int = 56
    num_kv_heads: int = 8
    rope_base: float = 10000.0


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 16
    top_k: int = 4
    ffn_hidden_size: int = 896
    shared_ffn_hidden_size: int = 1024  # 0: no shared expert
    score_function: Literal["softmax", "sigmoid"] = "sigmoid"
    expert_bias: bool = True  # aux-loss-free balancing bias (updated by megatron's finalize step)
    aux_loss_coeff: float = 1e-3
    load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"


@dataclass(frozen=True)
class MambaConfig:
    d_state: int = 64
    head_dim: int = 64
    ngroups: int = 8
    expand: int = 2
    conv_width: int = 4
    chunk_size: int = 128
    path: str = "auto"  # nam_mixers path: auto, fused, split, reference


@dataclass(frozen=True)
class M2RNNConfig:
    num_heads: int = 44
    head_dim_v: int = 16
    head_dim_k: int = 64
    num_qk_heads: int = 1
    conv_width: int = 4
    path: str = "auto"  # nam_mixers path: auto, triton, reference


@dataclass(frozen=True)
class ModelConfig:
    """One NAM model. Defaults are the NAM56R reference geometry of DESIGN.md."""

    hidden_size: int = 3584
    vocab_size: int = 65536
    seq_length: int = 4096
    ffn_hidden_size: int = 4 * 3584  # the dense '-' layer (SwiGLU)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    m2rnn: M2RNNConfig = field(default_factory=M2RNNConfig)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    untie_output: bool = True
    backend: Literal["auto", "local", "te"] = "auto"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int | None = None  # None: megatron's default, the tensor-parallel size
    sequence_parallel: bool = False
    recompute: Mapping[str, Recompute] = field(default_factory=dict)  # letter -> policy; absent = none
    params_dtype: str = "float32"  # float32 | bfloat16 | float16

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention.num_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            self.params_dtype
        ]

    def recompute_for(self, letter: str) -> Recompute:
        return self.recompute.get(letter, "none")

    def transformer_config(self, layout: Layout, letter: str | None = None) -> TransformerConfig:
        """megatron-core's config for this model (validated first); ``letter`` applies that
        letter's selective recomputation, which megatron reads from the config."""
        import torch
        import torch.nn.functional as F
        from megatron.core.transformer import TransformerConfig

        validate(self, layout)
        has_moe = "E" in layout.kinds
        policy = self.recompute_for(letter) if letter else "none"
        selective = {"A": ["core_attn"], "E": ["moe_act"], "-": ["mlp"]}.get(letter or "", [])
        moe = self.moe
        kw: dict[str, object] = {}
        if has_moe:
            kw = {
                "num_moe_experts": moe.num_experts,
                "moe_router_topk": moe.top_k,
                "moe_ffn_hidden_size": moe.ffn_hidden_size,
                "moe_shared_expert_intermediate_size": moe.shared_ffn_hidden_size or None,
                "moe_router_score_function": moe.score_function,
                "moe_router_enable_expert_bias": moe.expert_bias,
                "moe_router_dtype": "fp32",
                "moe_aux_loss_coeff": moe.aux_loss_coeff if moe.load_balancing != "none" else 0.0,
                "moe_router_load_balancing_type": moe.load_balancing,
                "moe_token_dispatcher_type": moe.dispatcher,
                "expert_model_parallel_size": self.expert_parallel,
                "expert_tensor_parallel_size": self.expert_tensor_parallel or self.tensor_parallel,
                "moe_grouped_gemm": True,  # both backends run grouped experts (and megatron gates 'moe_act' on it)
                "moe_router_topk_scaling_factor": None,
            }
        return TransformerConfig(
            num_layers=layout.depth,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.attention.num_heads,
            num_query_groups=self.attention.num_kv_heads,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_std,
            tensor_model_parallel_size=self.tensor_parallel,
            pipeline_model_parallel_size=self.pipeline_parallel,
            pipeline_dtype=self.torch_dtype,
            sequence_parallel=self.sequence_parallel,
            params_dtype=self.torch_dtype,
            bf16=self.params_dtype == "bfloat16",
            fp16=self.params_dtype == "float16",
            use_cpu_initialization=not torch.cuda.is_available(),
            masked_softmax_fusion=False,  # megatron's fused softmax is an absent CUDA extension
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            recompute_granularity="selective" if policy == "selective" and selective else None,
            recompute_modules=selective if policy == "selective" and selective else None,
            **kw,
        )


def validate(config: ModelConfig, layout: Layout) -> None:
    """Fail before allocation, naming what is wrong, where, and what would be accepted."""
    errors: list[str] = []
    kinds = set(layout.kinds)
    unknown = sorted(kinds - set(SPEC_LETTERS))
    if unknown:
        errors.append(
            f"layout letter(s) {unknown} have no nam-spec block; nam-spec builds {' '.join(SPEC_LETTERS)}"
        )
    h, att, tp = config.hidden_size, config.attention, config.tensor_parallel
    for name, value in (
        ("hidden_size", h),
        ("vocab_size", config.vocab_size),
        ("seq_length", config.seq_length),
        ("tensor_parallel", tp),
        ("pipeline_parallel", config.pipeline_parallel),
        ("expert_parallel", config.expert_parallel),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors.append(f"{name} must be a positive integer, got {value!r}")
    if errors:
        raise SpecConfigError("; ".join(errors))
    if config.backend not in ("auto", "local", "te"):
        errors.append(f"backend {config.backend!r} is unknown; accepted: 'auto', 'local', 'te'")
    if config.params_dtype not in ("float32", "bfloat16", "float16"):
        errors.append(f"params_dtype {config.params_dtype!r}; accepted: float32, bfloat16, float16")
    for letter, policy in config.recompute.items():
        if letter not in SPEC_LETTERS or policy not in ("none", "selective", "full"):
            errors.append(
                f"recompute[{letter!r}] = {policy!r}: keys are letters of {SPEC_LETTERS!r}, values "
                f"'none', 'selective' or 'full'"
            )
    if config.pipeline_parallel > layout.depth:
        errors.append(f"pipeline_parallel {config.pipeline_parallel} exceeds the depth {layout.depth}")
    if "A" in kinds:
        if h % att.num_heads:
            errors.append(
                f"attention: hidden_size {h} is not divisible by num_heads {att.num_heads} "
                f"(head dim = hidden / heads must be whole)"
            )
        if att.num_kv_heads < 1 or att.num_heads % att.num_kv_heads:
            errors.append(
                f"attention: num_heads {att.num_heads} must be a multiple of num_kv_heads {att.num_kv_heads}"
            )
        for what, n in (("num_heads", att.num_heads), ("num_kv_heads", att.num_kv_heads)):
            if n % tp:
                errors.append(f"attention: {what} {n} is not divisible by tensor_parallel {tp}")
    if "-" in kinds and config.ffn_hidden_size % tp:
        errors.append(
            f"dense MLP: ffn_hidden_size {config.ffn_hidden_size} not divisible by tensor_parallel {tp}"
        )
    if "E" in kinds:
        moe = config.moe
        if moe.num_experts < 1:
            errors.append(
                f"layout has {layout.counts['E']} E layer(s) but moe.num_experts is {moe.num_experts}; "
                f"E needs at least one expert"
            )
        elif not 1 <= moe.top_k <= moe.num_experts:
            errors.append(f"moe.top_k {moe.top_k} must lie in 1..num_experts ({moe.num_experts})")
        elif moe.num_experts % config.expert_parallel:
            errors.append(
                f"moe.num_experts {moe.num_experts} not divisible by expert_parallel {config.expert_parallel}"
            )
        etp = config.expert_tensor_parallel or tp
        if moe.ffn_hidden_size % etp:
            errors.append(
                f"moe: ffn_hidden_size {moe.ffn_hidden_size} not divisible by expert tensor parallel {etp}"
            )
        if moe.ffn_hidden_size < 1 or moe.shared_ffn_hidden_size < 0:
            errors.append("moe: ffn_hidden_size must be >= 1 and shared_ffn_hidden_size >= 0")
        elif moe.shared_ffn_hidden_size % tp:
            errors.append(f"moe: shared_ffn_hidden_size not divisible by tensor_parallel {tp}")
        if moe.score_function not in ("softmax", "sigmoid"):
            errors.append(f"moe.score_function {moe.score_function!r}; accepted: 'softmax', 'sigmoid'")
        if tp > 1 and not config.sequence_parallel:
            errors.append("E layers with tensor_parallel > 1 need sequence_parallel=True (megatron-core MoE)")
    if "M" in kinds:
        m = config.mamba
        d_inner = m.expand * h
        if d_inner % m.head_dim:
            errors.append(f"mamba: expand * hidden ({d_inner}) not divisible by head_dim {m.head_dim}")
        else:
            nheads = d_inner // m.head_dim
            if nheads % m.ngroups:
                errors.append(f"mamba: {nheads} heads not divisible by ngroups {m.ngroups}")
            if nheads % tp or m.ngroups % tp:
                errors.append(
                    f"mamba: heads ({nheads}) and ngroups ({m.ngroups}) must both be divisible by "
                    f"tensor_parallel {tp}"
                )
    if "R" in kinds:
        r = config.m2rnn
        if r.num_heads % tp:
            errors.append(f"m2rnn: num_heads {r.num_heads} not divisible by tensor_parallel {tp}")
        if r.num_heads % r.num_qk_heads:
            errors.append(f"m2rnn: num_heads {r.num_heads} not a multiple of num_qk_heads {r.num_qk_heads}")
        if tp > 1 and not config.sequence_parallel:
            errors.append(
                "R layers with tensor_parallel > 1 need sequence_parallel=True: the shared q/k head is "
                "replicated and its gradient is summed across ranks by the sequence-parallel reduction"
            )
    if config.sequence_parallel and tp > 1 and config.seq_length % tp:
        errors.append(
            f"seq_length {config.seq_length} not divisible by tensor_parallel {tp} (sequence parallel)"
        )
    if errors:
        raise SpecConfigError("invalid model config: " + "; ".join(errors))

"""Per-letter layer specs as data: one megatron ``ModuleSpec`` tree per letter and backend.

    A  TransformerLayer: norm -> SelfAttention (causal GQA, RoPE; qkv column-, proj row-parallel) -> bda
    E  MoETransformerLayer: norm -> MoELayer (fp32 TopKRouter, experts, optional shared expert) -> bda
    -  MLPLayer: norm -> SwiGLU MLP (fc1 column-, fc2 row-parallel) -> bda
    M  MixerLayer(MambaAdapter): norm -> nam_mixers MambaCore between parallel projections -> bda
    R  MixerLayer(M2RNNAdapter): norm -> nam_mixers M2RNNCore between parallel projections -> bda

With the te backend the pre-norms of A, '-' and the mixers live inside TE's fused
norm+linear modules; with local they are our RMSNorm.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import _build_shared_experts
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from nam_spec.adapters import M2RNNAdapter, MambaAdapter, MixerLayer, MixerLayerSubmodules
from nam_spec.backends import Backend
from nam_spec.config import SPEC_LETTERS, ModelConfig


def attention_spec(b: Backend) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if b.fused_norm else b.norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=b.norm_column_linear if b.fused_norm else b.column_linear,
                    core_attention=b.core_attention,
                    linear_proj=b.row_linear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )


def moe_spec(b: Backend) -> ModuleSpec:
    shared = partial(
        _build_shared_experts, submodules=MLPSubmodules(linear_fc1=b.column_linear, linear_fc2=b.row_linear)
    )
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=b.norm,
            mlp=partial(MoELayer, submodules=MoESubmodules(experts=b.experts, shared_experts=shared)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def mlp_spec(b: Backend) -> ModuleSpec:
    return ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=IdentityOp if b.fused_norm else b.norm,
            mlp=partial(
                MLP.as_mlp_submodule,
                submodules=MLPSubmodules(
                    linear_fc1=b.norm_column_linear if b.fused_norm else b.column_linear,
                    linear_fc2=b.row_linear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def mixer_spec(b: Backend, adapter: type, geometry: dict[str, object]) -> ModuleSpec:
    return ModuleSpec(
        module=MixerLayer,
        submodules=MixerLayerSubmodules(
            norm=b.norm,
            mixer=ModuleSpec(
                module=adapter,
                params={"column_linear": b.column_linear, "row_linear": b.row_linear, **geometry},
            ),
            bda=get_bias_dropout_add,
        ),
    )


def layer_specs(b: Backend, config: ModelConfig) -> dict[str, ModuleSpec]:
    """letter -> ModuleSpec for every letter nam-spec builds."""
    m, r = config.mamba, config.m2rnn
    specs = {
        "A": attention_spec(b),
        "E": moe_spec(b),
        "-": mlp_spec(b),
        "M": mixer_spec(
            b,
            MambaAdapter,
            {
                "d_state": m.d_state,
                "head_dim": m.head_dim,
                "ngroups": m.ngroups,
                "expand": m.expand,
                "conv_width": m.conv_width,
                "chunk_size": m.chunk_size,
                "path": m.path,
                "recompute_core": config.recompute_for("M") == "selective",
            },
        ),
        "R": mixer_spec(
            b,
            M2RNNAdapter,
            {
                "num_heads": r.num_heads,
                "head_dim_v": r.head_dim_v,
                "head_dim_k": r.head_dim_k,
                "num_qk_heads": r.num_qk_heads,
                "conv_width": r.conv_width,
                "path": r.path,
                "recompute_core": config.recompute_for("R") == "selective",
            },
        ),
    }
    assert set(specs) == set(SPEC_LETTERS)
    return specs

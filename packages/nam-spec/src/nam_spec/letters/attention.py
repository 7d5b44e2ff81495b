"""A: causal GQA self-attention with RoPE in megatron's TransformerLayer.

    norm -> SelfAttention (qkv column-, proj row-parallel; core attention per backend) -> bda

With the te backend the pre-norm lives inside TE's fused norm + qkv linear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nam_spec.config import ModelConfig, ParallelConfig, Recompute
from nam_spec.letters.base import Letter, LetterParams, activation_bytes

if TYPE_CHECKING:
    import torch

    from nam_spec.backends import Backend


class Attention(Letter):
    letter = "A"
    name = "attention"
    selective = ("core_attn",)
    # not graphable (nam_spec.graphs): its backward capture failed in bench/layer_graphs.py (a wait
    # on the legacy default stream), and eager the layer is GPU-bound already (2.98 ms, 2.94 of host)

    def spec(self, backend: Backend, config: ModelConfig) -> Any:
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
        from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.spec_utils import ModuleSpec
        from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

        b = backend
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

    def core(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attention.core_attention

    def decode_core(self, core: torch.nn.Module, context: Any) -> torch.nn.Module:
        from nam_spec.decode.cores import KVCacheAttention

        return KVCacheAttention(core, context)  # the KV cache

    def spec_core(self, spec: Any) -> Any:
        return spec.submodules.self_attention.submodules.core_attention

    def summary(self, config: ModelConfig) -> str:
        a = config.attention
        return f"attention {a.num_heads} heads / {a.num_kv_heads} KV (head dim {config.head_dim})"

    def params(self, config: ModelConfig) -> LetterParams:
        h, a, d = config.hidden_size, config.attention, config.head_dim
        mm = h * (a.num_heads * d + 2 * a.num_kv_heads * d) + a.num_heads * d * h
        return LetterParams(mm + h, mm + h, mm, tensor_split=mm, expert=0)  # the pre-norm replicated

    def extra_flops_per_token(self, config: ModelConfig) -> float:
        # causal attention: half of the dense 12 x seq x (heads x head dim)
        return 6.0 * config.seq_length * config.attention.num_heads * config.head_dim

    def inner_activations(
        self, config: ModelConfig, tokens: int, micro_batch: int, policy: Recompute, parallel: ParallelConfig
    ) -> int:
        # every tensor but the RoPE tables holds the rank's heads over the whole sequence
        a, hn, tp = activation_bytes(config), config.head_dim, parallel.tensor
        np_, ng = config.attention.num_heads // tp, config.attention.num_kv_heads // tp
        qkv = a * tokens * (np_ + 2 * ng) * hn  # linear_qkv's output stays whole: value is a view of it
        rotated = a * tokens * (np_ + ng) * hn  # query and key after RoPE (new tensors, saved by SDPA)
        rope = 4 * a * config.seq_length * hn  # cos and sin tables for query and key
        out = a * tokens * np_ * hn  # SDPA output, laid out as its query: linear_proj's input without a copy
        lse = 4 * tokens * np_  # flash attention's fp32 log-sum-exp; the core_attn checkpoint drops only it
        return qkv + rotated + rope + out + (0 if policy == "selective" else lse)

    def problems(self, config: ModelConfig, parallel: ParallelConfig) -> list[str]:
        h, att, tp = config.hidden_size, config.attention, parallel.tensor
        out = []
        if att.num_heads < 1 or h % att.num_heads:
            out.append(
                f"model.hidden_size {h} is not divisible by model.attention.num_heads {att.num_heads} "
                f"(the head dim is hidden_size / num_heads and must be whole)"
            )
        if att.num_kv_heads < 1 or att.num_heads % att.num_kv_heads:
            out.append(
                f"model.attention.num_heads {att.num_heads} must be a multiple of "
                f"model.attention.num_kv_heads {att.num_kv_heads}"
            )
        for what, n in (("num_heads", att.num_heads), ("num_kv_heads", att.num_kv_heads)):
            if n % tp:
                out.append(f"model.attention.{what} {n} is not divisible by parallel.tensor {tp}")
        if not att.rope_base > 0:
            out.append(f"model.attention.rope_base {att.rope_base} must be > 0")
        return out

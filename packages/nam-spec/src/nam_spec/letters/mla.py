"""L: multi-latent attention (DeepSeek-V2's MLA), a variant of A, in megatron's TransformerLayer.

    norm -> LatentAttention -> bda, where per token x (hidden h, n heads, rank r_q / r_kv):
      q   = up_q(norm_q(down_q(x)))                 [n, d_nope + d_rope]
      c, k_rope = split(down_kv(x))                 [r_kv], [d_rope]       (k_rope shared by heads)
      k_nope, v = split(up_kv(norm_kv(c)))          [n, d_nope], [n, d_v]
      q_rope, k_rope <- RoPE (megatron's MLA interleave) on the rotary dims
      out = proj(causal_attention([q_nope, q_rope], [k_nope, k_rope], v)), scale 1/sqrt(d_nope + d_rope)

megatron-core's MLASelfAttention computes it (``adapters.latent_attention`` bridges our stack's
RoPE and document-boundary conventions, and sums the shared rotary key's gradient over TP), with
column-parallel down and up projections (megatron's local MLA spec: the down projections' outputs
are gathered over TP, the up projections split the heads), row-parallel output, our RMSNorm for
the latent norms and our SDPAttention core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nam_spec.config import ModelConfig, ParallelConfig, Recompute
from nam_spec.letters.attention import Attention
from nam_spec.letters.base import LetterParams, activation_bytes

if TYPE_CHECKING:
    import torch

    from nam_spec.backends import Backend


class LatentAttentionLetter(Attention):
    letter = "L"
    name = "multi-latent attention"

    def spec(self, backend: Backend, config: ModelConfig) -> Any:
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
        from megatron.core.transformer.spec_utils import ModuleSpec
        from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

        from nam_spec.adapters import LatentAttention

        b = backend
        return ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=b.norm,  # MLA's down projections are separate linears: no fused norm
                self_attention=ModuleSpec(
                    module=LatentAttention,
                    params={"attn_mask_type": AttnMaskType.causal},
                    submodules=MLASelfAttentionSubmodules(
                        linear_q_proj=b.column_linear,
                        linear_q_down_proj=b.column_linear,
                        linear_q_up_proj=b.column_linear,
                        linear_kv_down_proj=b.column_linear,
                        linear_kv_up_proj=b.column_linear,
                        core_attention=b.core_attention,
                        linear_proj=b.row_linear,
                        q_layernorm=b.norm,
                        kv_layernorm=b.norm,
                    ),
                ),
                self_attn_bda=get_bias_dropout_add,
            ),
        )

    def core(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attention  # the whole MLA: its decode state is the latents, not keys

    def decode_core(self, core: torch.nn.Module, context: Any) -> torch.nn.Module:
        from nam_spec.decode.cores import LatentKVCache

        return LatentKVCache(core, context)

    def spec_core(self, spec: Any) -> Any:
        return spec.submodules.self_attention.module

    def layer_config(self, config: ModelConfig) -> tuple[type, dict[str, Any]]:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        a = config.attention
        return MLATransformerConfig, {
            "multi_latent_attention": True,
            "qk_layernorm": True,  # megatron's name for the latent norms (norm_q, norm_kv)
            "q_lora_rank": a.q_lora_rank,
            "kv_lora_rank": a.kv_lora_rank,
            "qk_head_dim": a.qk_head_dim,
            "qk_pos_emb_head_dim": a.qk_pos_emb_head_dim,
            "v_head_dim": a.v_head_dim,
            "rope_type": "rope",  # plain RoPE as A's; YaRN (megatron's default) would rescale it
            "rotary_base": a.rope_base,
            "rotary_scaling_factor": 1.0,  # softmax scale exactly 1 / sqrt(d_nope + d_rope)
        }

    def summary(self, config: ModelConfig) -> str:
        a = config.attention
        return (
            f"MLA {a.num_heads} heads, q rank {a.q_lora_rank}, kv rank {a.kv_lora_rank}, "
            f"qk {a.qk_head_dim}+{a.qk_pos_emb_head_dim} rope, v {a.v_head_dim}"
        )

    def params(self, config: ModelConfig) -> LetterParams:
        h, a = config.hidden_size, config.attention
        n, dq = a.num_heads, a.qk_head_dim + a.qk_pos_emb_head_dim
        mm = (
            h * a.q_lora_rank
            + a.q_lora_rank * n * dq
            + h * (a.kv_lora_rank + a.qk_pos_emb_head_dim)
            + a.kv_lora_rank * n * (a.qk_head_dim + a.v_head_dim)
        )
        mm += n * a.v_head_dim * h
        norms = h + a.q_lora_rank + a.kv_lora_rank  # pre-norm and latent norms, replicated
        return LetterParams(mm + norms, mm + norms, mm, tensor_split=mm, expert=0)

    def extra_flops_per_token(self, config: ModelConfig) -> float:
        # causal: 3 (fwd+bwd) x seq/2 x 2 FLOPs x heads x (q.k dims + p.v dims)
        a = config.attention
        return 3.0 * config.seq_length * a.num_heads * (a.qk_head_dim + a.qk_pos_emb_head_dim + a.v_head_dim)

    def inner_activations(
        self, config: ModelConfig, tokens: int, micro_batch: int, policy: Recompute, parallel: ParallelConfig
    ) -> int:
        a, at, tp = activation_bytes(config), config.attention, parallel.tensor
        np_, dq, dv = at.num_heads // tp, at.qk_head_dim + at.qk_pos_emb_head_dim, at.v_head_dim
        local = tokens // tp if parallel.sequence_parallel else tokens
        # latent norms: input, output and fp32 rstd on the rank's sequence shard
        latents = sum(2 * a * local * r + 4 * local for r in (at.q_lora_rank, at.kv_lora_rank))
        k_rope = a * tokens * at.qk_pos_emb_head_dim * 2  # the shared rotary key, before and after RoPE
        q_up = a * tokens * np_ * dq  # up projections' outputs; RoPE and cat make new q, k
        kv_up = a * tokens * np_ * (at.qk_head_dim + dv)
        qkv = a * tokens * np_ * (2 * dq + dv)  # contiguous query, key, value (SDPA saves them)
        out = a * tokens * np_ * dv
        lse = 4 * tokens * np_  # the core_attn checkpoint drops only it, as for A
        return latents + k_rope + q_up + kv_up + qkv + out + (0 if policy == "selective" else lse)

    def problems(self, config: ModelConfig, parallel: ParallelConfig) -> list[str]:
        at, tp = config.attention, parallel.tensor
        out = []
        # a full-rank query (megatron's q_lora_rank None) needs TE's fused norm + linear: not offered
        for what in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if getattr(at, what) < 1:
                out.append(f"model.attention.{what} {getattr(at, what)} must be >= 1 (L layers)")
        if out:
            return out
        if at.num_heads < 1 or at.num_heads % tp:
            out.append(
                f"model.attention.num_heads {at.num_heads} is not divisible by parallel.tensor {tp} "
                "(L layers split the heads across tensor ranks)"
            )
        if at.q_lora_rank % tp:
            out.append(
                f"model.attention.q_lora_rank {at.q_lora_rank} is not divisible by parallel.tensor {tp} "
                "(the query down projection is column-parallel)"
            )
        if (at.kv_lora_rank + at.qk_pos_emb_head_dim) % tp:
            out.append(
                f"model.attention.kv_lora_rank + qk_pos_emb_head_dim = {at.kv_lora_rank} + "
                f"{at.qk_pos_emb_head_dim} is not divisible by parallel.tensor {tp} "
                "(the key/value down projection is column-parallel)"
            )
        if at.qk_pos_emb_head_dim % 2:
            out.append(
                f"model.attention.qk_pos_emb_head_dim {at.qk_pos_emb_head_dim} must be even (RoPE pairs)"
            )
        if at.v_head_dim > at.qk_head_dim + at.qk_pos_emb_head_dim:
            out.append(
                f"model.attention.v_head_dim {at.v_head_dim} exceeds qk_head_dim + qk_pos_emb_head_dim "
                f"{at.qk_head_dim + at.qk_pos_emb_head_dim} (the flash kernel pads the value to the query's)"
            )
        if not at.rope_base > 0:
            out.append(f"model.attention.rope_base {at.rope_base} must be > 0")
        return out

"""megatron-core's MLASelfAttention (multi-latent attention, the L letter) in our stack.

Two conventions of our stack differ from what megatron's MLA expects, and one of its
tensor-parallel paths loses a gradient; this subclass bridges exactly those three. The math (down
projections, latent norms, up projections, decoupled RoPE on the rotary head dims, core attention,
output projection) is megatron's:

- The stack hands every layer the RoPE of the A letter's head dim; MLA builds its own for its
  rotary sub-dimension and refuses one passed in, so it is dropped here.
- Document boundaries arrive as PackedSeqParams over [s, b, h] activations (nam_spec.documents),
  not megatron's squeezed "thd" layout, which MLA's projections assume whenever packed params are
  given (they squeeze dim 1, the batch). The projections and RoPE therefore run as for an unpacked
  batch (RoPE is relative: no restart per document is needed) and only the core attention sees
  the boundaries.
- At TP > 1 the column-parallel key/value down projection (megatron's local spec) gathers its
  output over the TP ranks, and the gather's backward keeps each rank's slice of the gradient. The
  latent c is fine (it goes on through the column-parallel up projection, whose backward sums the
  ranks' heads), but the shared rotary key goes straight into every local head: its gradient on a
  rank is that rank's heads' part only. ``_qkv_down_projection`` sums it over the TP group.

For incremental decoding (nam_spec.decode, one rank) it also gives the absorbed form (DeepSeek-V2's
inference form): the key/value up projection W_uk, W_uv moves into the query and the output,
q_nope . (W_uk c) = (W_uk^T q_nope) . c and sum_t p_t W_uv c_t = W_uv sum_t p_t c_t, so attention
runs with one key/value head over the normed latents c and the rotated shared key, which are all
a cache keeps per token; RoPE there is at each token's own position.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class LatentAttention(MLASelfAttention):
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        kwargs["rotary_pos_emb"] = None
        return super().forward(hidden_states, attention_mask, **kwargs)

    def get_query_key_value_tensors(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        inference_context: Any = None,
        **kwargs: Any,
    ) -> Any:
        return super().get_query_key_value_tensors(
            hidden_states, key_value_states, position_ids, None, inference_context=inference_context, **kwargs
        )

    def _qkv_down_projection(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """megatron's down projections, with the key/value one gathered here at TP > 1: megatron
        then takes the branch of a replicated down projection, whose rotary-key gradient we fix."""
        q_compressed, kv = super()._qkv_down_projection(hidden_states)
        rank, rope = self.config.kv_lora_rank, self.config.qk_pos_emb_head_dim
        if kv.size(-1) == rank + rope:
            return q_compressed, kv  # one rank: nothing was split
        kv = gather_from_tensor_model_parallel_region(kv, group=self.tp_group)
        if self.config.sequence_parallel:
            # that branch gathers the rotary key back over the sequence: the backward, a
            # reduce-scatter, sums the ranks' parts
            return q_compressed, scatter_to_sequence_parallel_region(kv, group=self.tp_group)
        latent, k_rope = kv.split([rank, rope], dim=-1)
        k_rope = copy_to_tensor_model_parallel_region(k_rope, self.tp_group)  # backward: all-reduce
        return q_compressed, torch.cat([latent, k_rope], dim=-1)

    def absorbed_query_key_value(
        self, hidden_states: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [s, b, h] with RoPE ``positions`` [b, s] -> query [s, b, n, r_kv + d_rope] and one
        key [s, b, 1, r_kv + d_rope] and value [s, b, 1, r_kv] head: [W_uk^T q_nope, q_rope],
        [c, k_rope] and c. Scores and softmax scale are those of the forward."""
        dn, dr = self.config.qk_head_dim, self.config.qk_pos_emb_head_dim
        q_compressed, kv = self._qkv_down_projection(hidden_states)
        q, _ = self.linear_q_up_proj(self.q_layernorm(q_compressed))
        q_nope, q_rope = q.unflatten(-1, (-1, dn + dr)).split([dn, dr], dim=-1)
        latent, k_rope = kv.split([self.config.kv_lora_rank, dr], dim=-1)
        latent = self.kv_layernorm(latent)[:, :, None]
        freqs = self.rotary_pos_emb(int(positions.max()) + 1)[positions.T, 0]  # [s, b, 1, d_rope]
        cp = self.pg_collection.cp
        q_rope, k_rope = (
            apply_rotary_pos_emb(t, freqs, self.config, cp_group=cp, mla_rotary_interleaved=True)
            for t in (q_rope, k_rope[:, :, None])
        )
        w_k, _ = self._up_weights()
        query = torch.cat([torch.einsum("sbnd,ndr->sbnr", q_nope, w_k), q_rope], dim=-1)
        return query, torch.cat([latent, k_rope], dim=-1), latent

    def absorbed_output(self, attended: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over the latents [s, b, n * r_kv] -> the layer's (output, bias)."""
        _, w_v = self._up_weights()
        out = torch.einsum("sbnr,ndr->sbnd", attended.unflatten(-1, (-1, self.config.kv_lora_rank)), w_v)
        return self.linear_proj(out.flatten(2))

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk [n, d_nope, r_kv] and W_uv [n, d_v, r_kv] of the key/value up projection."""
        cfg = self.config
        per_head = self.linear_kv_up_proj.weight.unflatten(0, (-1, cfg.qk_head_dim + cfg.v_head_dim))
        w_k, w_v = per_head.split([cfg.qk_head_dim, cfg.v_head_dim], dim=1)
        return w_k, w_v

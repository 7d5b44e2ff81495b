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
"""

from __future__ import annotations

from typing import Any

import torch
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

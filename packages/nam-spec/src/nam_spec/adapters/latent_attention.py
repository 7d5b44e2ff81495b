"""megatron-core's MLASelfAttention (multi-latent attention, the L letter) in our stack.

Two conventions of our stack differ from what megatron's MLA expects, and this subclass bridges
exactly those two; the math (down projections, latent norms, up projections, decoupled RoPE on
the rotary head dims, core attention, output projection) is megatron's:

- The stack hands every layer the RoPE of the A letter's head dim; MLA builds its own for its
  rotary sub-dimension and refuses one passed in, so it is dropped here.
- Document boundaries arrive as PackedSeqParams over [s, b, h] activations (nam_spec.documents),
  not megatron's squeezed "thd" layout, which MLA's projections assume whenever packed params are
  given (they squeeze dim 1, the batch). The projections and RoPE therefore run as for an unpacked
  batch (RoPE is relative: no restart per document is needed) and only the core attention sees
  the boundaries.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams
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

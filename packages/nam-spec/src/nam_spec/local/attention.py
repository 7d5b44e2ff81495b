"""Core attention over PyTorch's scaled_dot_product_attention.

megatron-core's local DotProductAttention materialises the [b, heads, s, s] score matrix; SDPA
dispatches to flash / memory-efficient kernels on CUDA and never does. Same interface as
DotProductAttention: query [sq, b, np, hn], key/value [sk, b, ng, hn] (ng query groups, GQA),
returns [sq, b, np * hn]. Packed rows (PackedSeqParams with cu_seqlens) become a block-causal mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention: context parallelism needs the te backend")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"SDPAttention: mask type {attn_mask_type} unsupported; causal or no_mask")
        self.layer_number = layer_number
        self.causal = attn_mask_type == AttnMaskType.causal
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        sq, b, np_, hn = query.shape
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, self.causal
        if packed_seq_params is not None:
            mask, causal = _document_mask(packed_seq_params, sq, b, query.device), False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=k.shape[1] != np_,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def _document_mask(params: PackedSeqParams, s: int, b: int, device: torch.device) -> torch.Tensor:
    """Causal within each document of a packed row: [s, s] bool, True where attention is allowed."""
    if b != 1:
        raise ValueError(f"SDPAttention: packed sequences need micro-batch 1 (one packed row), got {b}")
    cu = params.cu_seqlens_q.to(device=device, dtype=torch.long)
    pos = torch.arange(s, device=device)
    doc = torch.searchsorted(cu[1:], pos, right=True)
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])

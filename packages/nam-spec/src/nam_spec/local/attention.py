"""Core attention over PyTorch's scaled_dot_product_attention.

megatron-core's local DotProductAttention materialises the [b, heads, s, s] score matrix; SDPA
dispatches to flash / memory-efficient kernels on CUDA and never does. Same interface as
DotProductAttention: query [sq, b, np, hn], key/value [sk, b, ng, hn] (ng query groups, GQA),
returns [sq, b, np * hv]. The value's head dim hv may differ from the query/key's hn (multi-latent
attention, which passes its own ``softmax_scale``); the flash kernel wants one head dim, so there
the value is zero-padded to hn and the output cut back to hv.

Document boundaries (PackedSeqParams from ``nam_spec.documents``, segments of the b * s tokens) at
any micro-batch size: on CUDA in bf16/fp16 through PyTorch's variable-length flash kernel
(``torch.nn.attention.varlen``, GQA native, no mask materialised); elsewhere (the CPU reference,
fp32) SDPA with a block-causal [b, 1, s, s] mask, which computes the same.
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
from torch.nn.attention.varlen import varlen_attn

from nam_spec.documents import derived, segment_ids

_VARLEN_DTYPES = (torch.bfloat16, torch.float16)  # the flash kernel's


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
        k_channels: int | None = None,  # MLA names its head dims; the tensors carry them
        v_channels: int | None = None,
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
        sq, b, np_ = query.shape[:3]
        if packed_seq_params is not None and query.is_cuda and query.dtype in _VARLEN_DTYPES:
            return self._varlen(query, key, value, packed_seq_params)
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, self.causal
        if packed_seq_params is not None:
            mask, causal = self._document_mask(packed_seq_params, sq, b, query.device), False
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
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * value.shape[-1])

    def _varlen(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSeqParams
    ) -> torch.Tensor:
        """The flash kernel on the b * s tokens flattened row by row ([tokens, heads, hn])."""
        if self.training and self.dropout > 0:
            raise ValueError(
                f"SDPAttention: attention dropout {self.dropout} with document boundaries; the "
                "variable-length flash kernel has none: set it to 0 or turn document masking off"
            )
        sq, b, np_, hn = query.shape
        hv = value.shape[-1]
        if hv != hn:
            value = F.pad(value, (0, hn - hv))
        q, k, v = (t.transpose(0, 1).reshape(b * sq, t.shape[2], hn) for t in (query, key, value))
        cu = params.cu_seqlens_q.to(device=query.device, dtype=torch.int32)
        out = varlen_attn(
            q,
            k,
            v,
            cu,
            cu,
            params.max_seqlen_q or sq,
            params.max_seqlen_kv or sq,
            scale=self.scale,
            window_size=(-1, 0) if self.causal else (-1, -1),
        )
        return out[..., :hv].reshape(b, sq, np_ * hv).transpose(0, 1).contiguous()

    def _document_mask(self, params: PackedSeqParams, s: int, b: int, device: torch.device) -> torch.Tensor:
        """[b, 1, s, s] bool, True where attention is allowed: same segment (and causal); made once
        per micro-batch, as every attention layer's is the same (SDPA keeps it for backward anyway)."""

        def make() -> torch.Tensor:
            seg = segment_ids(params, b, s, device)
            mask = seg[:, :, None] == seg[:, None, :]
            if self.causal:
                mask &= torch.ones(s, s, dtype=torch.bool, device=device).tril()
            return mask.unsqueeze(1)

        return derived(params, ("attention_mask", b, s, torch.device(device), self.causal), make)

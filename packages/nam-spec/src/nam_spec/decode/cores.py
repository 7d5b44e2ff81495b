"""The stand-ins a Decoder puts in place of the layers' cores: they compute what the core computes
and keep, between calls, what the next token needs of the past.

The first call after ``DecodeContext.seq_idx`` is set is the prefill: the whole (left-padded)
prompt in one parallel pass, documents given per token; every later call is one token per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecodeContext:
    """Shared by the stand-ins of one Decoder: the prefill's document index per token [b, s]
    (non-decreasing along a row; left padding is a document of its own), None during steps; the
    RoPE position of each token of the current call [b, s]."""

    seq_idx: torch.Tensor | None = None
    positions: torch.Tensor | None = None


class KVCacheAttention(nn.Module):
    """Core attention (query [sq, b, np, hn], key [sk, b, ng, hn], value [sk, b, ng, hv] -> [sq, b,
    np * hv]) over the keys and values of every token so far, kept per layer. A query sees the keys
    of its own document only: block-causal in the prefill, the last document's keys in a step."""

    def __init__(self, core: nn.Module, context: DecodeContext) -> None:
        super().__init__()
        self.core, self.context = core, context
        self.key: torch.Tensor | None = None  # [b, ng, tokens, hn]
        self.value: torch.Tensor | None = None
        self.documents: torch.Tensor | None = None  # [b, tokens]

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any
    ) -> torch.Tensor:
        sq, _, np_, _ = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        docs = self.context.seq_idx
        if docs is not None:
            self.key, self.value, self.documents = k, v, docs
            causal = torch.ones(sq, sq, dtype=torch.bool, device=q.device).tril()
            mask = (docs[:, :, None] == docs[:, None, :]) & causal  # [b, sq, sk]
        else:
            assert self.key is not None and self.value is not None and self.documents is not None
            self.key, self.value = torch.cat([self.key, k], dim=2), torch.cat([self.value, v], dim=2)
            self.documents = torch.cat([self.documents, self.documents[:, -1:]], dim=1)
            mask = (self.documents == self.documents[:, -1:])[:, None, :]  # [b, 1, sk]
        out = F.scaled_dot_product_attention(
            q,
            self.key,
            self.value,
            attn_mask=mask[:, None],
            scale=self.core.scale,
            enable_gqa=self.key.shape[1] != np_,
        )
        return out.permute(2, 0, 1, 3).flatten(2)


class LatentKVCache(nn.Module):
    """Multi-latent attention (the L letter's adapters.LatentAttention: hidden [s, b, h] -> (output,
    bias)) keeping per token only its normed latent and rotated shared key instead of every head's
    key and value: 2 r_kv + d_rope numbers against n (d_qk + d_v) (the KVCacheAttention it reuses
    holds the latent twice, in the key and as the value). Runs the absorbed form with RoPE at the
    positions the context gives."""

    def __init__(self, attention: nn.Module, context: DecodeContext) -> None:
        super().__init__()
        self.attention, self.context = attention, context
        self.cache = KVCacheAttention(attention.core_attention, context)  # its scale is the forward's

    def forward(
        self, hidden_states: torch.Tensor, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.context.positions is not None
        query, key, value = self.attention.absorbed_query_key_value(hidden_states, self.context.positions)
        return self.attention.absorbed_output(self.cache(query, key, value))


class RecurrentCore(nn.Module):
    """A nam-mixers core with ``prefill(*inputs, seq_idx) -> (y, state)`` and ``step(*inputs,
    state) -> (y, state)`` (MambaCore, M2RNNCore), called as the adapter calls the core:
    ``core(*inputs, seq_idx)``."""

    def __init__(self, core: nn.Module, context: DecodeContext) -> None:
        super().__init__()
        self.core, self.context = core, context
        self.state: Any = None

    def forward(self, *args: torch.Tensor | None) -> torch.Tensor:
        *inputs, _ = args  # the adapter's seq_idx: None, the documents come from the context
        if self.context.seq_idx is not None:
            y, self.state = self.core.prefill(*inputs, self.context.seq_idx)
        else:
            y, self.state = self.core.step(*inputs, self.state)
        return y

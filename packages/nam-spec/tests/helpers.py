"""Tiny geometries shared by the tests (every letter, widths that keep each test well under a
second), and what a layer saves for backward."""

from __future__ import annotations

import torch

from nam_layout import Layout
from nam_spec.config import AttentionConfig, M2RNNConfig, MambaConfig, ModelConfig, MoEConfig, ParallelConfig

MAMBA3 = MambaConfig(kind="mamba3", d_state=8, head_dim=8, ngroups=2, chunk_size=4, path="reference")


def tiny(**changes: object) -> ModelConfig:
    config = ModelConfig(
        hidden_size=32,
        vocab_size=64,
        seq_length=8,
        ffn_hidden_size=48,
        attention=AttentionConfig(
            num_heads=4,
            num_kv_heads=2,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_head_dim=8,
            qk_pos_emb_head_dim=4,
            v_head_dim=6,
        ),
        moe=MoEConfig(
            num_experts=4, top_k=2, ffn_hidden_size=16, shared_ffn_hidden_size=16, dispatcher="allgather"
        ),
        mamba=MambaConfig(d_state=8, head_dim=8, ngroups=2, chunk_size=4, path="reference"),
        m2rnn=M2RNNConfig(num_heads=4, head_dim_v=4, head_dim_k=8, path="reference"),
        backend="local",
    )
    return config.replace(**changes) if changes else config


def latent_layer(config: ModelConfig, parallel: ParallelConfig | None = None) -> torch.nn.Module:
    """One L layer (multi-latent attention) on the local backend, its norms away from 1 so that a
    missing norm shows."""
    from megatron.core.transformer.spec_utils import build_module

    from nam_spec.backends import local_backend
    from nam_spec.letters import LETTERS
    from nam_spec.transformer_config import transformer_config

    tc = transformer_config(config, Layout.tile("L", 1), parallel, letter="L")
    layer = build_module(LETTERS["L"].spec(local_backend(), config), config=tc, layer_number=1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return layer


def saved_bytes(layer: torch.nn.Module, x: torch.Tensor, **kwargs: object) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded (each one
    held until the count is done, so that no address is reused by another)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, **kwargs)
    return sum(s.nbytes() for s in storages.values())

"""Named geometries. ``nam56r`` is DESIGN.md's reference; the smaller ones keep the NAM56R pattern
and depth (52 layers) and shrink widths so they build and train on one CPU or a small GPU."""

from __future__ import annotations

from nam_spec.config import AttentionConfig, M2RNNConfig, MambaConfig, ModelConfig, MoEConfig

PRESETS: dict[str, ModelConfig] = {
    # hidden 3584, 56/8 heads of 64, vocab 65536, seq 4096, untied output; MoE 16 experts top-4,
    # FFN 896 + shared 1024, sigmoid router; Mamba state 64, head 64, 8 groups, expand 2;
    # M2RNN 44 value heads of 16, one shared q/k head of 64.
    "nam56r": ModelConfig(),
    # about 1/4 width: a GPU smoke model with the same pattern and depth
    "nam56r-small": ModelConfig(
        hidden_size=1024,
        vocab_size=32768,
        seq_length=2048,
        ffn_hidden_size=4096,
        attention=AttentionConfig(num_heads=16, num_kv_heads=4),
        moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=256, shared_ffn_hidden_size=512),
        mamba=MambaConfig(d_state=32, head_dim=64, ngroups=4),
        m2rnn=M2RNNConfig(num_heads=16, head_dim_v=16, head_dim_k=64),
    ),
    # tiny: CPU tests and examples (still 52 layers of the NAM56R pattern)
    "nam56r-tiny": ModelConfig(
        hidden_size=32,
        vocab_size=256,
        seq_length=16,
        ffn_hidden_size=64,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=16, shared_ffn_hidden_size=16),
        mamba=MambaConfig(d_state=8, head_dim=8, ngroups=2, chunk_size=8, path="reference"),
        m2rnn=M2RNNConfig(num_heads=4, head_dim_v=4, head_dim_k=8, path="reference"),
    ),
}


def preset(name: str, **changes: object) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"no preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]

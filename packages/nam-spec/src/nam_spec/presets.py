"""Named models, defined once, as data: nam-spec's CLI and nam-train's presets both name these.

``nam56r`` is DESIGN.md's reference geometry; the smaller ones keep the NAM56R pattern and depth
(52 layers) and shrink widths. A nam-train preset names one of these and adds only training,
data, checkpoint and plasticity settings.
"""

from __future__ import annotations

from nam_spec.config import AttentionConfig, EmbeddingConfig, M2RNNConfig, MambaConfig, ModelConfig, MoEConfig

PRESETS: dict[str, ModelConfig] = {
    # hidden 3584, 56/8 heads of 64, vocab 65536, seq 4096, untied output; MoE 16 experts top-4,
    # FFN 896 + shared 1024, sigmoid router; Mamba state 64, head 64, 8 groups, expand 2;
    # M2RNN 44 value heads of 16, one shared q/k head of 64; n-gram and structure embeddings.
    "nam56r": ModelConfig(
        embedding=EmbeddingConfig(ngram=True, structure=True),
        recompute="selective",
        params_dtype="bfloat16",
    ),
    # hidden 2048: about 2 B parameters, 0.6 B active, sized to train on one H200 with bf16
    # weights, fp32 master weights and Adam state (bench/RESULTS.md's model)
    "nam56r-small": ModelConfig(
        hidden_size=2048,
        ffn_hidden_size=4 * 2048,
        attention=AttentionConfig(num_heads=32, num_kv_heads=8),
        moe=MoEConfig(num_experts=16, top_k=4, ffn_hidden_size=512, shared_ffn_hidden_size=576),
        m2rnn=M2RNNConfig(num_heads=24, head_dim_v=16, head_dim_k=64),
        embedding=EmbeddingConfig(ngram=True, structure=True),
        recompute="selective",
        params_dtype="bfloat16",
    ),
    # hidden 128: the CPU default, a useful run in minutes on 2 cores in fp32
    "nam56r-tiny": ModelConfig(
        hidden_size=128,
        vocab_size=4096,
        seq_length=256,
        ffn_hidden_size=512,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=128, shared_ffn_hidden_size=128),
        mamba=MambaConfig(d_state=16, head_dim=32, ngroups=1),
        m2rnn=M2RNNConfig(num_heads=4, head_dim_v=16, head_dim_k=32),
        embedding=EmbeddingConfig(
            ngram=True,
            ngram_heads=4,
            ngram_table_size=4099,
            ngram_dim=8,
            structure=True,
            structure_bottleneck=16,
        ),
        params_dtype="float32",
    ),
}


def preset(name: str, **changes: object) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"no preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]

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
    # The seed system's production geometry (DatasunriseOU/cppmega: README "NAM56R", recipes/
    # run_profiles.py h200_dsa_9_4_m, recipes/megatron_args.py), with what this stack builds:
    # 52 layers of AEMEAEMEAEMR with MLA in all 13 attention layers (family NAM56R-MLA), hidden
    # 4096, 32 heads, vocab 131072, sequence 4096; MLA q/kv ranks 64, qk 64 + rope 64, v 64;
    # MoE 16 experts top-4, FFN 896 + shared 1024; Mamba-3 (SISO) with state 128, 8 groups; an MTP
    # head of depth 2; n-gram hash (2,3-grams, 8 heads, 500k rows, dim 16) and structure
    # embeddings; bf16, selective recompute.
    # Still missing against the seed: DeepSeek sparse attention on 9 of the 13 MLA layers (indexer
    # top-k 256; out of scope here); Mamba-3 MIMO (rank 4, chunk 16: TileLang kernels, not on our
    # machines), so the M layers are Mamba-3 SISO at mamba-ssm's chunk 64; the seed's R layers,
    # which are Mamba-family blocks there and M2RNN here. The seed's dense FFN 21504 is kept though
    # only the MTP depths' '-' layers use it; its RoPE base and router details are not taken (ours:
    # 10000, sigmoid).
    "cppmega-nam56r": ModelConfig(
        family="NAM56R-MLA",
        hidden_size=4096,
        vocab_size=131072,
        seq_length=4096,
        ffn_hidden_size=21504,
        attention=AttentionConfig(
            num_heads=32,
            num_kv_heads=32,
            q_lora_rank=64,
            kv_lora_rank=64,
            qk_head_dim=64,
            qk_pos_emb_head_dim=64,
            v_head_dim=64,
        ),
        moe=MoEConfig(num_experts=16, top_k=4, ffn_hidden_size=896, shared_ffn_hidden_size=1024),
        mamba=MambaConfig(kind="mamba3", d_state=128, head_dim=64, ngroups=8, expand=2, chunk_size=64),
        embedding=EmbeddingConfig(ngram=True, structure=True),
        mtp_depth=2,
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

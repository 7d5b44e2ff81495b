"""The trainer's configuration as nam-spec's model configuration: the one place that maps it.

Training, ``--dry-run`` (parameters and memory) and the GPU benchmark all build from this, so a
preset means the same model everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nam_trainer.config import Config, ConfigError, resolve_layout

if TYPE_CHECKING:
    from nam_layout import Layout
    from nam_spec import ModelConfig

PARAMS_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class ModelSetup:
    """What ``nam_spec.build_model`` needs: the geometry, the layout, HybridEmbedding's extras."""

    config: ModelConfig
    layout: Layout
    # HybridEmbedding's extras by name: ngram (NgramHashConfig), structure (StructureConfig)
    embedding: dict[str, Any] = field(default_factory=dict)


def resolved_precision(precision: str, cuda: bool) -> str:
    """``training.precision`` with ``auto`` decided: bf16 on GPU, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def model_setup(cfg: Config, *, precision: str, backend: str = "auto") -> ModelSetup:
    """nam-spec's config for ``cfg`` at ``precision`` (``bf16`` or ``fp32``, already resolved)."""
    from nam_embed import NgramHashConfig, StructureConfig
    from nam_spec import AttentionConfig, M2RNNConfig, MambaConfig, ModelConfig, MoEConfig

    m, e, p = cfg.model, cfg.embedding, cfg.parallel
    if m.head_dim * m.num_attention_heads != m.hidden_size:
        raise ConfigError(
            f"model.kv_channels = {m.kv_channels}: nam-spec uses head dim = hidden_size / num_attention_heads "
            f"= {m.hidden_size // m.num_attention_heads}; set it to 0 or to that value"
        )
    if precision not in PARAMS_DTYPE:
        raise ConfigError(
            f"precision {precision!r}: accepted values are 'bf16', 'fp32' (resolve 'auto' first)"
        )
    recompute = {} if cfg.training.recompute == "none" else dict.fromkeys("AEMR-", cfg.training.recompute)
    config = ModelConfig(
        hidden_size=m.hidden_size,
        vocab_size=cfg.tokenizer.vocab_size,
        seq_length=cfg.data.seq_length,
        ffn_hidden_size=m.ffn_hidden_size,
        attention=AttentionConfig(num_heads=m.num_attention_heads, num_kv_heads=m.num_query_groups),
        moe=MoEConfig(
            num_experts=cfg.moe.num_experts,
            top_k=cfg.moe.router_topk,
            ffn_hidden_size=cfg.moe.ffn_hidden_size,
            shared_ffn_hidden_size=cfg.moe.shared_expert_ffn_hidden_size,
            score_function=cfg.moe.router_score_function,  # type: ignore[arg-type]
            aux_loss_coeff=cfg.moe.aux_loss_coeff,
        ),
        mamba=MambaConfig(
            d_state=cfg.mamba.state_dim,
            head_dim=cfg.mamba.head_dim,
            ngroups=cfg.mamba.num_groups,
            expand=cfg.mamba.expand,
            path=cfg.mamba.path,
        ),
        m2rnn=M2RNNConfig(
            num_heads=cfg.m2rnn.num_v_heads, head_dim_v=cfg.m2rnn.v_head_dim, head_dim_k=cfg.m2rnn.k_head_dim
        ),
        untie_output=m.untie_embeddings_and_output_weights,
        backend=backend,  # type: ignore[arg-type]
        tensor_parallel=p.tensor,
        pipeline_parallel=p.pipeline,
        expert_parallel=p.expert,
        sequence_parallel=p.sequence_parallel,
        recompute=recompute,
        params_dtype=PARAMS_DTYPE[precision],
    )
    embedding: dict[str, Any] = {}
    if e.ngram:
        embedding["ngram"] = NgramHashConfig(
            orders=tuple(e.ngram_orders), heads=e.ngram_heads, table_size=e.ngram_table_size, dim=e.ngram_dim
        )
    if e.structure and cfg.data.structure != "none":
        embedding["structure"] = StructureConfig(bottleneck=e.structure_bottleneck)
    return ModelSetup(config, resolve_layout(cfg), embedding)

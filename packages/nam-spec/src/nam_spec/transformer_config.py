"""The one place a model config becomes megatron-core's ``TransformerConfig``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nam_layout import Layout
from nam_spec.config import ModelConfig, ParallelConfig
from nam_spec.letters import LETTERS
from nam_spec.validation import validate

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig


def transformer_config(
    config: ModelConfig, layout: Layout, parallel: ParallelConfig | None = None, letter: str | None = None
) -> TransformerConfig:
    """megatron-core's config for this model (validated first); ``letter`` applies that letter's
    selective recomputation, which megatron reads from the config, and its own layer config."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    from nam_runtime.megatron import install_wgrad_accumulation

    parallel = parallel or ParallelConfig()
    validate(config, layout, parallel)
    kw: dict[str, object] = {}
    for key in dict.fromkeys(layout.kinds):
        kw.update(LETTERS[key].transformer_config_fields(config, parallel))
    block = LETTERS[letter] if letter else None
    modules = (
        list(block.selective)
        if block and block.megatron_recompute and config.recompute_for(block.letter) == "selective"
        else None
    )
    config_class, own = block.layer_config(config) if block else (TransformerConfig, {})
    kw.update(own)
    dtype = config.torch_dtype
    if config.gradient_accumulation_fusion:
        install_wgrad_accumulation()  # before the layers, which check for the extension
    return config_class(
        num_layers=layout.depth,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.attention.num_heads,
        num_query_groups=config.attention.num_kv_heads,
        kv_channels=config.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=config.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=config.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        pipeline_dtype=dtype,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        masked_softmax_fusion=False,  # megatron's fused softmax is an absent CUDA extension
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        # only where the weight has DDP's main_grad; any other weight gets its .grad as before
        gradient_accumulation_fusion=config.gradient_accumulation_fusion,
        persist_layer_norm=False,
        recompute_granularity="selective" if modules else None,
        recompute_modules=modules,
        # read by megatron's embedding set-up and finalize_model_grads (the copy on the last stage)
        # and its schedules; nam-spec's model builds the depths itself (nam_spec.mtp)
        mtp_num_layers=config.mtp_depth or None,
        mtp_loss_scaling_factor=config.mtp_loss_weight,
        **kw,
    )

"""Small real megatron-core layers for the tests (local spec, CPU initialisation)."""

from __future__ import annotations

import torch


def config(tp: int = 1, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        ffn_hidden_size=48,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        params_dtype=torch.float32,
        init_method_std=0.02,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def transformer_layer(cfg, moe: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts if moe else None)
    return build_module(spec, config=cfg, layer_number=1)


def mlp_submodules():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec().submodules.mlp.keywords["submodules"]

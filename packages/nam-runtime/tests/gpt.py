"""A tiny GPT from megatron-core's own local layers and its training step, for the tests.

Layers alternate a dense MLP and an MoE layer (4 experts, top-2) behind causal attention. Every
function here runs inside a rank after `nam_runtime.dist.initialize`. Weights are initialised on
the CPU from the full master weight (`use_cpu_initialization`), so a model built at TP=2 or PP=2
holds the same numbers as at TP=1, PP=1.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig

VOCAB = 64
SEQ = 16
HIDDEN = 32
HEADS = 4


def config(*, moe: bool = True, layers: int = 4, **overrides: Any) -> TransformerConfig:
    """fp32, no dropout, no biases; `moe` alternates dense MLP and MoE layers."""
    kwargs: dict[str, Any] = dict(
        num_layers=layers,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=2 * HIDDEN,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,  # megatron's SequentialMLP adds a bias in place on a TP=1 view
    )
    if moe:
        kwargs.update(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=HIDDEN,
            moe_layer_freq=[i % 2 for i in range(layers)],
            moe_token_dispatcher_type="alltoall",
            moe_aux_loss_coeff=0.0,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def model(cfg: TransformerConfig) -> GPTModel:
    """This pipeline stage's part of the model."""
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def batch(step: int, size: int) -> dict[str, torch.Tensor]:
    """The global batch of `step`: the same numbers in every process."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (size, SEQ + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(SEQ).expand(size, SEQ).contiguous(),
    }


def shard(data: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This data-parallel rank's rows of a global batch."""
    rows = next(iter(data.values())).shape[0]
    if rows % world:
        raise ValueError(f"global batch of {rows} rows does not split over {world} data-parallel ranks")
    per = rows // world
    return {key: value[rank * per : (rank + 1) * per] for key, value in data.items()}


def loss(module: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token loss of one forward through `module` (all pipeline stages in one process)."""
    per_token = module(data["tokens"], data["position_ids"], None, labels=data["labels"])
    return per_token.float().mean()

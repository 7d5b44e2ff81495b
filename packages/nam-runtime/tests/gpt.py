"""A tiny GPT from megatron-core's own local layers and its training step, for the tests.

Layers alternate a dense MLP and an MoE layer (4 experts, top-2) behind causal attention. Every
function here runs inside a rank after `nam_runtime.dist.initialize`. Weights are initialised on
the CPU from the full master weight (`use_cpu_initialization`), so a model built at TP=2 or PP=2
holds the same numbers as at TP=1, PP=1.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
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
        pipeline_dtype=torch.float32,
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


def _loss_func(
    labels_mask: torch.Tensor, per_token: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = (per_token.float() * labels_mask).sum() / labels_mask.sum()
    return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place


def _forward_step(data_iterator: Any, module: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    data = next(data_iterator)
    per_token = module(data["tokens"], data["position_ids"], None, labels=data["labels"])
    return per_token, partial(_loss_func, torch.ones_like(data["labels"], dtype=torch.float32))


def save(module: GPTModel, directory: str) -> None:
    """Save `module` with dist_checkpointing (every rank calls it)."""
    dist_checkpointing.save(module.sharded_state_dict(), directory)


def load(module: GPTModel, directory: str) -> None:
    """Load a dist_checkpointing checkpoint saved at any parallel layout into `module`."""
    module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), directory))


def train(
    *,
    steps: int,
    global_batch: int,
    micro_batch: int,
    moe: bool = True,
    lr: float = 1e-2,
    save_init: str | None = None,
    load_init: str | None = None,
) -> list[float]:
    """megatron's whole training path: DDP wrapper, distributed optimizer (Adam), the forward-backward
    schedule of this pipeline size, finalize_model_grads. Returns the loss of every step (the same on
    every rank); the data-parallel ranks split each global batch. `save_init` / `load_init`: a
    directory to save the initial weights to or load them from (dist_checkpointing), so runs at
    different layouts start from the same numbers."""
    cfg = config(moe=moe)
    module = model(cfg)
    if save_init is not None:
        save(module, save_init)
    if load_init is not None:
        load(module, load_init)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    if global_batch % (micro_batch * dp):
        raise ValueError(
            f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x dp {dp}"
        )
    num_micro = global_batch // (micro_batch * dp)
    ddp = DistributedDataParallel(
        cfg,
        DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
        module,
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, use_distributed_optimizer=True, clip_grad=1.0), [ddp]
    )
    schedule = get_forward_backward_func()
    losses = []
    for step in range(steps):
        micro = [shard(shard(batch(0, global_batch), dp_rank, dp), i, num_micro) for i in range(num_micro)]
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = schedule(
            forward_step_func=_forward_step,
            data_iterator=iter(micro),
            model=[ddp],
            num_microbatches=num_micro,
            seq_length=SEQ,
            micro_batch_size=micro_batch,
            forward_only=False,
        )
        ok, _, _ = opt.step()
        if not ok:
            raise RuntimeError(f"optimizer step {step} was skipped")
        # the loss lives on the last pipeline stage; average it over data-parallel ranks and share it
        local = torch.tensor([sum(o["loss"].item() for o in out) / num_micro if out else 0.0])
        torch.distributed.all_reduce(local)
        losses.append(local.item() / dp)
    return losses

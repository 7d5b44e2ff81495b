"""A tiny real training setup for the checkpoint tests, run inside ranks (`run_ranks`) or a killed
subprocess: nam-spec's model of one short pattern (with nam-embed's n-gram hash tables) in megatron's DDP, megatron's Adam (distributed
optimizer optionally), OptimizerParamScheduler (warm-up then cosine), one schedule step per batch.

Each step draws from every RNG a resume must restore: python `random` picks the batch seed, numpy
a loss-mask row, torch's CPU generator the tokens, and megatron's tensor-parallel tracker (a fork
of it) a perturbation of the mask, so a run whose RNG is not restored diverges at once.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nam_runtime import dist

PATTERN = "AEMR"
VOCAB = 64
SEQ = 8
MICRO_BATCH = 2
LR = 1e-2


def seed_all(seed: int) -> None:
    """Every RNG a run draws from (python, numpy, torch CPU, megatron's tracker), from `seed`; a
    resumed run calls it with another seed so that only the checkpoint can make it match."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def model_config(hidden: int = 32, bf16: bool = False, mtp_depth: int = 0) -> Any:
    from nam_spec import AttentionConfig, EmbeddingConfig, M2RNNConfig, MambaConfig, ModelConfig, MoEConfig

    return ModelConfig(
        params_dtype="bfloat16" if bf16 else "float32",
        hidden_size=hidden,
        vocab_size=VOCAB,
        seq_length=SEQ,
        ffn_hidden_size=48,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        moe=MoEConfig(
            num_experts=4, top_k=2, ffn_hidden_size=16, shared_ffn_hidden_size=16, dispatcher="allgather"
        ),
        mamba=MambaConfig(d_state=8, head_dim=8, ngroups=2, chunk_size=4, path="reference"),
        m2rnn=M2RNNConfig(num_heads=4, head_dim_v=4, head_dim_k=8, path="reference"),
        # replica-marked n-gram tables
        embedding=EmbeddingConfig(
            ngram=True, ngram_orders=(2, 3), ngram_heads=2, ngram_table_size=31, ngram_dim=4
        ),
        backend="local",
        mtp_depth=mtp_depth,
    )


@dataclass
class Setup:
    model: list[Any]  # [DDP(NamModel)]
    optimizer: Any
    scheduler: Any


def build(
    *,
    distributed_optimizer: bool,
    hidden: int = 32,
    pattern: str = PATTERN,
    warmup_steps: int = 2,
    decay_steps: int = 20,
    bf16: bool = False,
    pipeline: int = 1,
    expert: int = 1,
    mtp_depth: int = 0,
    fused_adam: bool = False,
) -> Setup:
    """`bf16`: bf16 parameters with fp32 main parameters in the optimizer (megatron's GPU setup);
    `fused_adam`: torch's fused AdamW, as the trainer's training.fused_adam."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from nam_layout import Layout
    from nam_runtime.megatron import fuse_torch_adams
    from nam_spec import ParallelConfig, build_model
    from nam_trainer.train.setup import finalize_with_embedding_copies

    module = build_model(
        Layout.tile(pattern, len(pattern)),
        model_config(hidden, bf16, mtp_depth),
        ParallelConfig(pipeline=pipeline, expert=expert),
    )
    tc = module.config
    ddp = DistributedDataParallel(
        tc,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
        ),
        module,
    )
    tc.no_sync_func = ddp.no_sync
    # with MTP at PP > 1 the last stage's embedding copy must step like the first stage's
    tc.finalize_model_grads_func = (
        partial(finalize_with_embedding_copies, [module]) if mtp_depth else finalize_model_grads
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=LR,
            min_lr=LR / 10,
            weight_decay=0.1,
            clip_grad=1.0,
            use_distributed_optimizer=distributed_optimizer,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
        ),
        [ddp],
    )
    if fused_adam:
        fuse_torch_adams(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=LR,
        min_lr=LR / 10,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style="cosine",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=20,
        wd_incr_style="constant",
    )
    return Setup([ddp], optimizer, scheduler)


def _batch(dp_rank: int, dp: int) -> dict[str, torch.Tensor]:
    """This rank's rows of the step's global batch, drawn from every RNG (see the module doc)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    seed = random.randrange(2**31)
    masked_row = int(np.random.randint(0, 2 * dp))
    tokens = torch.randint(0, VOCAB, (2 * dp, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    tokens = (tokens + torch.randint(0, VOCAB, (1,))) % VOCAB
    with get_cuda_rng_tracker().fork():  # on a GPU the forked CUDA generator, on CPU a CPU one
        mask = (torch.rand(2 * dp, SEQ, device=device()) > 0.2).float()
    mask[masked_row] = 0.0
    rows = slice(dp_rank * MICRO_BATCH, (dp_rank + 1) * MICRO_BATCH)
    on = device()
    return {"tokens": tokens[rows, :-1].to(on), "labels": tokens[rows, 1:].to(on), "mask": mask[rows]}


def _loss(mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The masked mean; with multi-token prediction ([1 + D, b, s]) plus 0.1 x the depths' mean."""
    from nam_spec.mtp import mtp_loss_masks

    masks = mask.unsqueeze(0)
    if per_token.dim() == 3:
        masks = torch.cat([masks, mtp_loss_masks(mask, per_token.shape[0] - 1)])
    means = (per_token.float().view(-1, *mask.shape) * masks).sum((1, 2)) / masks.sum((1, 2)).clamp(min=1.0)
    loss = means[0] + 0.1 * means[1:].mean() if len(means) > 1 else means[0]
    return loss, {"loss": loss.detach().clone()}


def _forward(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
    data = next(data_iterator)
    positions = torch.arange(SEQ, device=data["tokens"].device).expand_as(data["tokens"])
    return model(data["tokens"], positions, labels=data["labels"]), partial(_loss, data["mask"])


def train(setup: Setup, steps: int) -> list[tuple[float, float]]:
    """`steps` optimizer steps -> (data-parallel mean loss, lr after the step) per step."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    out = []
    for _ in range(steps):
        for chunk in setup.model:
            chunk.zero_grad_buffer()
        setup.optimizer.zero_grad()
        stats = get_forward_backward_func()(
            forward_step_func=_forward,
            data_iterator=iter([_batch(dp_rank, dp)]),
            model=setup.model,
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        ok, _, _ = setup.optimizer.step()
        assert ok, "optimizer step skipped"
        setup.scheduler.step(1)
        # the loss lives on the last pipeline stage: summed over its data-parallel ranks, shared with all
        loss = stats[0]["loss"].reshape(1) if stats else torch.zeros(1, device=device())
        torch.distributed.all_reduce(loss)
        out.append(((loss / dp).item(), setup.optimizer.param_groups[0]["lr"]))
    return out


def weights(setup: Setup) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in setup.model[0].module.state_dict().items() if v is not None}


def main() -> None:
    """Subprocess entry for the kill test: `python ckpt_run.py RUN_DIR WEIGHTS_FILE`: trains, saves
    step 2, stores its weights, trains on and starts saving step 4 (where the test kills it)."""
    from nam_trainer.train.checkpoint import save_checkpoint

    run_dir, weights_file = Path(sys.argv[1]), Path(sys.argv[2])
    dist.initialize(seed=3)
    seed_all(3)
    setup = build(distributed_optimizer=True, hidden=int(sys.argv[3]))
    train(setup, 2)
    save_checkpoint(run_dir, 2, setup.model, setup.optimizer, setup.scheduler, {"step": 2}, keep_last=3)
    torch.save(weights(setup), weights_file)
    train(setup, 2)
    print("saving step 4", flush=True)
    save_checkpoint(run_dir, 4, setup.model, setup.optimizer, setup.scheduler, {"step": 4}, keep_last=3)
    print("saved step 4", flush=True)


if __name__ == "__main__":
    main()

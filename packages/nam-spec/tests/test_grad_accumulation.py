"""model.gradient_accumulation_fusion: weight gradients written straight into megatron DDP's fp32
main_grad (nam_runtime.wgrad for the linear layers, nam_embed.lookup for the n-gram tables) give
the gradients and optimizer steps of the separate adds, uses of one weight included; at two pipeline
stages too, where the last stage's copy of a tied word embedding is both the output layer's weight
and the multi-token-prediction depths' embedding."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import tiny

from nam_layout import Layout
from nam_runtime.megatron import reset_moe_state
from nam_runtime.testing import run_ranks
from nam_spec import build_model
from nam_spec.config import EmbeddingConfig, ModelConfig, ParallelConfig

LAYOUT = Layout.tile("AEMR-", 5)
PP_LAYOUT = Layout.tile("AM|R-", 4)  # two stages
NGRAM = EmbeddingConfig(ngram=True, ngram_heads=2, ngram_table_size=101, ngram_dim=4)
MICRO_BATCHES, STEPS = 3, 3


def _train(config: ModelConfig, state: dict[str, Any]) -> dict[str, Any]:
    """STEPS optimizer steps of MICRO_BATCHES micro-batches under megatron's DDP and Adam: every
    micro-batch's loss, the first step's main_grads and the parameters whose gradient skipped
    DDP's separate add."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    reset_moe_state()
    model = build_model(LAYOUT, config)
    model.load_state_dict(state)
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
        model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0, use_distributed_optimizer=True), [ddp]
    )
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(config.seq_length).expand(2, -1)
    losses, grads, fused = [], {}, set()
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        for _ in range(MICRO_BATCHES):
            ids = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=gen)
            loss = ddp(ids, positions, labels=ids).mean()
            loss.backward()
            losses.append(loss.item())
        if step == 0:
            grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
            fused = {n for n, p in model.named_parameters() if p.grad_added_to_main_grad}
        ddp.finish_grad_sync()
        opt.step()
    return {"losses": losses, "grads": grads, "fused": fused}


@pytest.mark.parametrize("untie_output", [True, False], ids=["untied", "tied"])
def test_fused_accumulation_matches_separate_adds(untie_output: bool, megatron_single_rank: None) -> None:
    # multi-token prediction uses the output layer and the embedding (n-gram tables included) twice
    # per micro-batch; tied, the word embedding is also the output layer's weight
    config = tiny(embedding=NGRAM, mtp_depth=1, untie_output=untie_output)
    reset_moe_state()
    state = build_model(LAYOUT, config).state_dict()
    fused = _train(config, state)
    plain = _train(config.replace(gradient_accumulation_fusion=False), state)

    assert plain["fused"] == set()
    linears = {
        f"{name}.weight"
        for name, module in build_model(LAYOUT, config).named_modules()
        if type(module).__name__ in ("ColumnParallelLinear", "RowParallelLinear")
        and getattr(module, "weight", None) is not None
    }
    # tied, the output layer's weight is the word embedding's
    shared = set() if untie_output else {"embedding.word_embeddings.weight"}
    assert fused["fused"] == linears | shared | {"embedding.ngram.weight"}
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(fused["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(fused["losses"], plain["losses"], rtol=1e-5, atol=0)


def _pp2_step(config: ModelConfig, state: dict[str, Any]) -> dict[str, Any]:
    """One step's gradients at two pipeline stages, as nam-train makes them: 2 micro-batches through
    megatron's schedule under DDP, then finalize_model_grads (the word embedding summed over the
    first and last stage) and the sum of the embedding extras over the same stages. This stage's
    losses, main_grads and the parameters whose gradient skipped DDP's separate add."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = build_model(PP_LAYOUT, config, ParallelConfig(pipeline=2))
    model.load_state_dict(state)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    gen = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, config.vocab_size, (2, config.seq_length), generator=gen) for _ in range(2)]
    positions = torch.arange(config.seq_length).expand(2, -1)

    def forward_step(data: Any, chunk: Any) -> tuple[torch.Tensor, Any]:
        ids = next(data)  # the last stage embeds them too, shifted, for the depths
        return chunk(ids, positions, labels=ids), lambda out: (out.mean(), {"loss": out.mean().detach()})

    ddp.zero_grad_buffer()
    stats = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[ddp],
        num_microbatches=len(micro),
        seq_length=config.seq_length,
        micro_batch_size=2,
    )
    fused = {n for n, p in model.named_parameters() if p.grad_added_to_main_grad}
    finalize_model_grads([ddp])
    model.allreduce_embedding_copy_grads()
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return {"losses": [s["loss"].item() for s in stats], "grads": grads, "fused": fused}


def _pp2_rank() -> None:
    """Fused against separate adds on this rank's stage, compared here: tensors handed back through
    run_ranks' queue are shared by file descriptor, which fails once the rank has exited."""
    from megatron.core import parallel_state

    from nam_runtime import dist

    dist.initialize(pipeline_parallel=2, seed=1)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    config = tiny(embedding=NGRAM, mtp_depth=1, untie_output=False)
    state = build_model(PP_LAYOUT, config, ParallelConfig(pipeline=2)).state_dict()
    fused = _pp2_step(config, state)
    plain = _pp2_step(config.replace(gradient_accumulation_fusion=False), state)

    assert plain["fused"] == set()
    # the n-gram tables fuse on both stages; the word embedding on the last, as the output layer's weight
    assert "embedding.ngram.weight" in fused["fused"]
    assert ("embedding.word_embeddings.weight" in fused["fused"]) == (stage == 1)
    assert fused["grads"].keys() == plain["grads"].keys()
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(
            fused["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=f"stage {stage}: {name}"
        )
    torch.testing.assert_close(fused["losses"], plain["losses"], rtol=1e-5, atol=0)


def test_fused_accumulation_matches_separate_adds_at_two_stages_with_tied_mtp_embedding() -> None:
    # the last stage's word embedding gets a fused (output layer) and a plain (the depth's lookup)
    # gradient, which DDP adds only under NamModel's zero_out_wgrad mark (megatron's is for one stage)
    run_ranks(_pp2_rank, 2, timeout_s=180)

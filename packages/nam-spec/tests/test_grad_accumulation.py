"""model.gradient_accumulation_fusion: weight gradients written straight into megatron DDP's fp32
main_grad (nam_runtime.wgrad for the linear layers, nam_embed.lookup for the n-gram tables) give
the gradients and optimizer steps of the separate adds, uses of one weight included."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import tiny

from nam_layout import Layout
from nam_runtime.megatron import reset_moe_state
from nam_spec import build_model
from nam_spec.config import EmbeddingConfig, ModelConfig

LAYOUT = Layout.tile("AEMR-", 5)
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

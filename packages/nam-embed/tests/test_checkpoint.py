"""HybridEmbedding on two pipeline stages (two gloo processes): the first stage holds the main
replica, the later stage (multi-token prediction) a copy. megatron's checkpoint validation passes
only with the copy marked; dist_checkpointing round-trips it; the copies' gradients sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_ranks

VOCAB, SEQ = 64, 8


def _two_stages(rank: int, world_size: int, ckpt_dir: str, roundtrip: bool) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import (
        determine_global_metadata,
        validate_sharding_integrity,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nam_embed.hashing import NgramHashConfig
    from nam_embed.hybrid_embedding import HybridEmbedding
    from nam_embed.structure import StructureConfig

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    first_stage = parallel_state.is_pipeline_first_stage()
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
    )

    def build(seed: int) -> HybridEmbedding:
        torch.manual_seed(seed)
        module = HybridEmbedding(
            cfg,
            VOCAB,
            SEQ,
            "rope",
            ngram=NgramHashConfig(table_size=1000, dim=4, heads=2),
            structure=StructureConfig(),
            main_replica=first_stage,
        )
        with torch.no_grad():  # every tensor differs between stages and between builds
            for p in module.parameters():
                p.normal_()
        return module

    def validate(module: HybridEmbedding) -> None:
        _, global_metadata = determine_global_metadata(module.sharded_state_dict(prefix="embedding."))
        validate_sharding_integrity(global_metadata)

    saved = build(10 + rank)
    validate(saved)
    saved.main_replica = True  # both stages claiming the main replica: megatron refuses to save
    if rank == 0:
        with pytest.raises(
            CheckpointingException, match=r"Invalid access pattern for ShardedTensor\(key='embedding"
        ):
            validate(saved)
    else:
        validate(saved)  # only global rank 0 judges; it raises above
    saved.main_replica = first_stage

    # The stage copies' gradients: summed over the stages, equal afterwards.
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(rank))
    structure = {c.name: torch.zeros(2, SEQ, dtype=torch.long) for c in StructureConfig().schema.channels}
    saved(ids, torch.arange(SEQ).expand(2, SEQ), structure=structure).square().sum().backward()
    own = [p.grad.clone() for p in saved.extra_parameters()]
    saved.allreduce_extra_grads(torch.distributed.group.WORLD)
    for p, mine in zip(saved.extra_parameters(), own, strict=True):
        theirs = [torch.empty_like(mine) for _ in range(world_size)]
        torch.distributed.all_gather(theirs, mine)
        torch.testing.assert_close(p.grad, theirs[0] + theirs[1])
    assert len(own) == 5

    if roundtrip:
        dist_checkpointing.save(saved.sharded_state_dict(prefix="embedding."), ckpt_dir)
        fresh = build(100 + rank)
        loaded = dist_checkpointing.load(fresh.sharded_state_dict(prefix="embedding."), ckpt_dir)
        fresh.load_state_dict({k.removeprefix("embedding."): v for k, v in loaded.items()})
        states: list[dict[str, torch.Tensor] | None] = [None] * world_size
        torch.distributed.all_gather_object(states, saved.state_dict())
        first = states[0]
        assert first is not None
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, first[name]), f"stage {rank}: {name} differs from the first stage's"
    parallel_state.destroy_model_parallel()


def test_later_stage_copy_is_a_replica(tmp_path: Path) -> None:
    run_ranks(_two_stages, 2, tmp_path, str(tmp_path / "ckpt"), False)


def test_dist_checkpointing_round_trip_on_two_stages(tmp_path: Path) -> None:
    # dist_checkpointing's saver synchronises and allocates on the CUDA device: on CPU that
    # needs nam-runtime's patches.
    pytest.importorskip("nam_runtime.cpu", reason="waits on nam-runtime (branch runtime)")
    (tmp_path / "ckpt").mkdir()
    run_ranks(_two_stages, 2, tmp_path, str(tmp_path / "ckpt"), True)

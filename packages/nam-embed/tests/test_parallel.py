"""HybridEmbedding at TP = 2 (two gloo processes) equals TP = 1, with and without sequence
parallelism: outputs and the gradient of every parameter; its checkpoint saved at TP = 2 loads at
TP = 1."""

from __future__ import annotations

from pathlib import Path

import torch

from nam_runtime import dist
from nam_runtime.testing import run_ranks

VOCAB, SEQ, BATCH, HIDDEN = 64, 8, 2, 16
# With sequence parallelism: where upstream reduce-scatters the word embedding (rope: no learned
# positions) and where it scatters after adding learned positions.
SP_CASES = (("rope", True), ("learned_absolute", True))


def _tp2_equals_tp1(cases: tuple[tuple[str, bool], ...], ckpt_dir: str | None) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import (
        determine_global_metadata,
        validate_sharding_integrity,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nam_embed.hashing import NgramHashConfig
    from nam_embed.hybrid_embedding import HybridEmbedding
    from nam_embed.structure import StructureConfig

    rank = dist.initialize(tensor_parallel=2).rank
    tp_group = parallel_state.get_tensor_model_parallel_group()
    alone = [torch.distributed.new_group([r]) for r in range(2)][rank]  # every rank makes every group
    ngram = NgramHashConfig(table_size=1000, dim=4, heads=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4]).expand(BATCH, SEQ)  # two documents
    schema = StructureConfig().schema
    structure = {c.name: torch.randint(0, c.vocab, (BATCH, SEQ), generator=gen) for c in schema.channels}
    weights = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)

    def build(
        position_type: str, group: torch.distributed.ProcessGroup, sp: bool, seed: int
    ) -> HybridEmbedding:
        cfg = TransformerConfig(
            num_layers=1,
            hidden_size=HIDDEN,
            num_attention_heads=2,
            use_cpu_initialization=True,
            hidden_dropout=0.0,
            tensor_model_parallel_size=group.size(),
            sequence_parallel=sp,
        )
        torch.manual_seed(seed)
        return HybridEmbedding(
            cfg, VOCAB, SEQ, position_type, tp_group=group, ngram=ngram, structure=StructureConfig()
        )

    def row_start(module: HybridEmbedding, name: str) -> int:
        return module.word_embeddings.vocab_start_index if name.startswith("word") else module.ngram.row_start

    sharded = ("word_embeddings.weight", "ngram.weight")
    for position_type, sp in cases:
        case = f"{position_type}, sp={sp}"
        ref = build(position_type, alone, False, seed=1)
        tp = build(position_type, tp_group, sp, seed=1)
        with torch.no_grad():
            for p in (ref.ngram.proj.weight, ref.structure.up.weight, ref.structure.scales):
                p.normal_(generator=torch.Generator().manual_seed(2))
            for name, p in tp.named_parameters():
                full = ref.get_parameter(name)
                if name in sharded:
                    piece = full[row_start(tp, name) :][: p.shape[0]]
                    # The n-gram shard already is this rank's rows of the seeded whole.
                    assert name != "ngram.weight" or torch.equal(p, piece)
                    p.copy_(piece)
                else:
                    p.copy_(full)

        out_ref = ref(ids, positions, structure=structure)
        out_tp = tp(ids, positions, structure=structure)
        rows = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2) if sp else slice(None)
        assert out_tp.shape == out_ref[rows].shape, case
        torch.testing.assert_close(out_tp, out_ref[rows], rtol=1e-6, atol=1e-6, msg=case)

        (out_ref * weights).sum().backward()
        (out_tp * weights[rows]).sum().backward()
        for name, p in tp.named_parameters():
            want = ref.get_parameter(name).grad
            if name in sharded:
                want = want[row_start(tp, name) :][: p.shape[0]]
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6, msg=f"{case}: grad of {name}")

    # The checkpoint view: the n-gram weight as two row halves of one global tensor whose shape
    # does not depend on TP; megatron's validation accepts it, and TP = 1 loads it whole.
    entries = tp.sharded_state_dict(prefix="embedding.")
    weight = entries["embedding.ngram.weight"]
    assert weight.global_shape == (ngram.rows, ngram.dim)
    assert weight.global_offset == (rank * ngram.rows // 2, 0)
    validate_sharding_integrity(determine_global_metadata(entries)[1])
    if ckpt_dir is None:
        return
    dist_checkpointing.save(entries, ckpt_dir)
    fresh = build(position_type, alone, False, seed=3)
    # Both ranks load the whole at TP = 1: as data-parallel replicas of each other.
    as_dp = {"dp_cp_group": torch.distributed.group.WORLD}
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(prefix="embedding.", metadata=as_dp), ckpt_dir)
    fresh.load_state_dict({k.removeprefix("embedding."): v for k, v in loaded.items()})
    for name, value in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), f"TP=2 checkpoint loaded at TP=1: {name}"


def test_tensor_parallel_equals_single_rank_and_checkpoint_reshards(tmp_path: Path) -> None:
    run_ranks(
        _tp2_equals_tp1, 2, (("learned_absolute", False), ("rope", False)), str(tmp_path), timeout_s=150
    )


def test_sequence_parallel_equals_single_rank() -> None:
    run_ranks(_tp2_equals_tp1, 2, SP_CASES, None, timeout_s=150)

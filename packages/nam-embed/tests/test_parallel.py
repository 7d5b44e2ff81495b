"""HybridEmbedding at TP = 2 (two gloo processes) equals TP = 1, with and without sequence
parallelism: outputs, and gradients of every parameter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_ranks

VOCAB, SEQ, BATCH, HIDDEN = 64, 8, 2, 16


def _tp2_equals_tp1(rank: int, world_size: int, position_type: str, sequence_parallel: bool) -> None:
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nam_embed.hashing import NgramHashConfig
    from nam_embed.hybrid_embedding import HybridEmbedding
    from nam_embed.structure import StructureConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    alone = torch.distributed.new_group([0])
    alone = alone if rank == 0 else torch.distributed.new_group([1])
    ngram = NgramHashConfig(table_size=1000, dim=4, heads=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4]).expand(BATCH, SEQ)
    schema = StructureConfig().schema
    structure = {c.name: torch.randint(0, c.vocab, (BATCH, SEQ), generator=gen) for c in schema.channels}
    weights = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)

    def build(tp: int, group: torch.distributed.ProcessGroup, sp: bool) -> HybridEmbedding:
        cfg = TransformerConfig(
            num_layers=1,
            hidden_size=HIDDEN,
            num_attention_heads=2,
            use_cpu_initialization=True,
            hidden_dropout=0.0,
            tensor_model_parallel_size=tp,
            sequence_parallel=sp,
        )
        kw = {"ngram": ngram, "structure": StructureConfig()}
        return HybridEmbedding(cfg, VOCAB, SEQ, position_type, tp_group=group, **kw)

    torch.manual_seed(1)
    ref = build(1, alone, False)
    torch.manual_seed(1)
    tp = build(2, parallel_state.get_tensor_model_parallel_group(), sequence_parallel)
    with torch.no_grad():
        for p in (ref.ngram.proj.weight, ref.structure.up.weight, ref.structure.scales):
            p.normal_(generator=torch.Generator().manual_seed(2))
        shards = {"word_embeddings.weight": tp.word_embeddings, "ngram.weight": tp.ngram}
        for name, p in tp.named_parameters():
            full = ref.get_parameter(name)
            if name in shards:
                # The n-gram shard is this rank's rows of the seeded whole, with no copying.
                start = getattr(shards[name], "vocab_start_index", getattr(shards[name], "row_start", 0))
                piece = full[start : start + p.shape[0]]
                if name == "ngram.weight":
                    assert torch.equal(p, piece)
                p.copy_(piece)
            else:
                p.copy_(full)

    out_ref = ref(ids, positions, structure=structure)
    out_tp = tp(ids, positions, structure=structure)
    rows = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2) if sequence_parallel else slice(None)
    case = f"{position_type}, sp={sequence_parallel}"
    assert out_tp.shape == out_ref[rows].shape, case
    torch.testing.assert_close(out_tp, out_ref[rows], rtol=1e-6, atol=1e-6, msg=case)

    (out_ref * weights).sum().backward()
    (out_tp * weights[rows]).sum().backward()
    for name, p in tp.named_parameters():
        want = ref.get_parameter(name).grad
        if name in shards:
            start = getattr(shards[name], "vocab_start_index", getattr(shards[name], "row_start", 0))
            want = want[start : start + p.shape[0]]
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6, msg=f"{case}: grad of {name}")
    parallel_state.destroy_model_parallel()


@pytest.mark.parametrize(
    ("position_type", "sequence_parallel"),
    [("learned_absolute", False), ("rope", True), ("learned_absolute", True)],
)
def test_tensor_parallel_equals_single_rank(
    tmp_path: Path, position_type: str, sequence_parallel: bool
) -> None:
    if sequence_parallel:
        # Upstream's sequence-parallel embedding forks megatron's CUDA RNG tracker and allocates
        # its reduce-scatter output on the CUDA device: on CPU that needs nam-runtime.
        pytest.importorskip("nam_runtime.cpu", reason="waits on nam-runtime (branch runtime)")
    run_ranks(_tp2_equals_tp1, 2, tmp_path, position_type, sequence_parallel)

"""HybridEmbedding in one process (TP = 1): upstream equivalence, placement of the extras,
checkpoint entries."""

from __future__ import annotations

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig

from nam_embed.hashing import NgramHashConfig
from nam_embed.hybrid_embedding import HybridEmbedding
from nam_embed.structure import StructureConfig

pytestmark = pytest.mark.usefixtures("megatron_single_rank")

VOCAB, SEQ, BATCH = 96, 12, 3
NGRAM = NgramHashConfig(table_size=1000, dim=4)


def _config(dropout: float = 0.0) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        use_cpu_initialization=True,
        hidden_dropout=dropout,
    )


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    positions = torch.cat([torch.arange(5), torch.arange(SEQ - 5)]).expand(BATCH, SEQ)  # two documents
    schema = StructureConfig().schema
    structure = {c.name: torch.randint(0, c.vocab, (BATCH, SEQ), generator=gen) for c in schema.channels}
    return ids, positions, structure


def _pair(
    position_type: str, dropout: float = 0.0, **extras: object
) -> tuple[LanguageModelEmbedding, HybridEmbedding]:
    torch.manual_seed(7)
    upstream = LanguageModelEmbedding(_config(dropout), VOCAB, SEQ, position_embedding_type=position_type)
    torch.manual_seed(7)
    hybrid = HybridEmbedding(_config(dropout), VOCAB, SEQ, position_embedding_type=position_type, **extras)
    return upstream, hybrid


@pytest.mark.parametrize("position_type", ["learned_absolute", "rope"])
def test_off_is_upstream(position_type: str) -> None:
    upstream, hybrid = _pair(position_type, dropout=0.1)
    ids, positions, _ = _inputs()
    torch.manual_seed(1)
    want = upstream(ids, positions)
    torch.manual_seed(1)
    assert torch.equal(hybrid(ids, positions), want)
    assert hybrid.state_dict().keys() == upstream.state_dict().keys()
    assert hybrid.sharded_state_dict().keys() == upstream.sharded_state_dict().keys()


@pytest.mark.parametrize("position_type", ["learned_absolute", "rope"])
def test_on_at_init_is_upstream_then_adds_before_dropout(position_type: str) -> None:
    upstream, hybrid = _pair(position_type, dropout=0.1, ngram=NGRAM, structure=StructureConfig())
    ids, positions, structure = _inputs()
    torch.manual_seed(1)
    want = upstream(ids, positions)
    torch.manual_seed(1)
    assert torch.equal(hybrid(ids, positions, structure=structure), want)

    # Once the projections move, the extras join the word embedding before dropout: with the
    # same dropout mask, output = mask * (upstream_pre_dropout + extras) / keep.
    torch.nn.init.normal_(hybrid.ngram.proj.weight)
    torch.nn.init.normal_(hybrid.structure.up.weight)
    upstream.eval(), hybrid.eval()
    extras = hybrid.extras(ids, positions, structure).transpose(0, 1)
    assert extras.abs().sum() > 0
    torch.testing.assert_close(hybrid(ids, positions, structure=structure), upstream(ids, positions) + extras)
    upstream.train(), hybrid.train()
    torch.manual_seed(2)
    dropped = hybrid(ids, positions, structure=structure)
    torch.manual_seed(2)
    mask = upstream(ids, positions) != 0
    torch.testing.assert_close(dropped, (upstream.eval()(ids, positions) + extras) * mask / 0.9)


def test_gradients_reach_every_extra() -> None:
    _, hybrid = _pair("rope", ngram=NGRAM, structure=StructureConfig())
    ids, positions, structure = _inputs()
    torch.nn.init.normal_(hybrid.ngram.proj.weight)
    torch.nn.init.normal_(hybrid.structure.up.weight)
    hybrid(ids, positions, structure=structure).pow(2).sum().backward()
    for name, p in hybrid.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_structure_channels_required_when_on_and_refused_when_off() -> None:
    ids, positions, structure = _inputs()
    _, hybrid = _pair("rope", structure=StructureConfig())
    with pytest.raises(ValueError, match=r"structure embedding is enabled \(channels \['category'"):
        hybrid(ids, positions)
    _, plain = _pair("rope", ngram=NGRAM)
    with pytest.raises(ValueError, match="structure channels given but the structure embedding is off"):
        plain(ids, positions, structure=structure)
    bad = dict(structure, depth=structure["depth"][:, :-1])
    with pytest.raises(ValueError, match=r"channel 'depth': shape \(3, 11\) != input_ids shape \(3, 12\)"):
        hybrid(ids, positions, structure=bad)


def test_checkpoint_entries_and_later_stage_replicas() -> None:
    _, hybrid = _pair("rope", ngram=NGRAM, structure=StructureConfig())
    entries = hybrid.sharded_state_dict(prefix="embedding.")
    assert entries.keys() == {f"embedding.{k}" for k in hybrid.state_dict()}
    weight = entries["embedding.ngram.weight"]
    assert weight.global_shape == (NGRAM.rows, NGRAM.dim) and weight.axis_fragmentations == (1, 1)
    assert all(isinstance(e, ShardedTensor) and e.replica_id == (0, 0, 0) for e in entries.values())
    hybrid.main_replica = False
    assert all(e.replica_id == (1, 0, 0) for e in hybrid.sharded_state_dict(prefix="embedding.").values())


def test_same_config_same_extras_on_every_stage() -> None:
    # A later-stage copy starts from the same tables without any communication.
    _, first = _pair("rope", ngram=NGRAM, structure=StructureConfig())
    torch.manual_seed(99)  # another stage's RNG state
    later = HybridEmbedding(
        _config(),
        VOCAB,
        SEQ,
        position_embedding_type="rope",
        ngram=NGRAM,
        structure=StructureConfig(),
        main_replica=False,
    )
    for name in (
        "ngram.weight",
        "ngram.proj.weight",
        "structure.weight",
        "structure.scales",
        "structure.up.weight",
    ):
        assert torch.equal(first.get_parameter(name), later.get_parameter(name)), name

"""NgramHashEmbedding as a module: zero-init, learning, row shards, seeded tables."""

from __future__ import annotations

import torch

from nam_embed.hashing import NgramHashConfig
from nam_embed.ngram import NgramHashEmbedding

CFG = NgramHashConfig(orders=(2, 3), heads=2, table_size=1000, dim=4, seed=5)


def test_zero_at_init_and_learns() -> None:
    torch.manual_seed(0)
    module = NgramHashEmbedding(CFG, 16)
    ids = torch.randint(0, 500, (2, 24))
    out = module(ids)
    assert out.shape == (2, 24, 16) and not out.any()
    target = torch.randn(2, 24, 16)
    ((out - target) ** 2).mean().backward()
    # The projection sees random lookups, so it learns at once; the tables wait one step for it.
    assert module.proj.weight.grad.abs().sum() > 0
    assert not module.weight.grad.any()
    torch.optim.SGD(module.parameters(), lr=1.0).step()
    assert module(ids)[:, 2:].abs().sum() > 0


def test_tables_seeded_and_padding_rows_zero() -> None:
    a, b = NgramHashEmbedding(CFG, 8), NgramHashEmbedding(CFG, 8)
    assert torch.equal(a.weight, b.weight)
    other = NgramHashEmbedding(NgramHashConfig(orders=(2, 3), heads=2, table_size=1000, dim=4, seed=6), 8)
    assert not torch.equal(a.weight, other.weight)
    used = sum(CFG.primes())
    assert not a.weight[used:].any() and a.weight[:used].std() > 0.01


def test_row_shards_sum_to_the_whole_exactly() -> None:
    torch.manual_seed(0)
    whole = NgramHashEmbedding(CFG, 8)
    torch.nn.init.normal_(whole.proj.weight)
    cut = CFG.rows // 2
    shards = [NgramHashEmbedding(CFG, 8, row_range=r) for r in ((0, cut), (cut, CFG.rows))]
    for shard in shards:
        assert torch.equal(shard.weight, whole.weight[shard.row_start : shard.row_end])
    ids = torch.randint(0, 10_000, (3, 40))
    positions = torch.cat([torch.arange(17), torch.arange(23)]).expand(3, 40)
    parts = [s.lookup(ids, positions) for s in shards]
    # Each lookup lives on exactly one shard: the other contributes an exact zero.
    assert not (parts[0] * parts[1]).any()
    assert torch.equal(parts[0] + parts[1], whole.lookup(ids, positions))

    # The same through `reduce`, as tensor parallelism wires it (here: a sum over the two shards).
    for shard, other_part in zip(shards, reversed(parts), strict=True):
        shard.reduce = lambda x, other=other_part: x + other
        shard.proj.weight.data.copy_(whole.proj.weight)
        assert torch.equal(shard(ids, positions), whole(ids, positions))


def test_builds_on_the_meta_device_with_the_same_shapes() -> None:
    """Shapes without values: what parameter counts and memory plans of big tables build."""
    from nam_embed.structure import StructureConfig, StructureEmbedding

    for make in (lambda: NgramHashEmbedding(CFG, 8), lambda: StructureEmbedding(StructureConfig(), 8)):
        real = make()
        with torch.device("meta"):
            meta = make()
        assert all(p.is_meta for p in meta.parameters())
        assert [p.shape for p in meta.parameters()] == [p.shape for p in real.parameters()]

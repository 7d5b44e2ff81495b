"""Which rows a step reads: a function of the samples consumed, split over data-parallel ranks
without gaps or overlaps, a fresh permutation per epoch."""

from __future__ import annotations

from nam_trainer.train.batches import Shard, TrainOrder


def test_order_is_a_seeded_permutation_per_epoch() -> None:
    order = TrainOrder(rows=10, seed=3)
    first, second = order.global_batch(0, 10), order.global_batch(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert TrainOrder(rows=10, seed=3).global_batch(7, 6) == first[7:] + second[:3]  # resumable anywhere
    assert TrainOrder(rows=10, seed=4).global_batch(0, 10) != first


def test_data_parallel_ranks_split_the_global_batch() -> None:
    samples = TrainOrder(rows=50, seed=0).global_batch(12, 8)
    one = Shard(global_batch=8, micro_batch=2, dp_rank=0, dp_size=1).rows(samples)
    assert one == [samples[0:2], samples[2:4], samples[4:6], samples[6:8]]
    two = [Shard(8, 2, rank, 2).rows(samples) for rank in range(2)]
    assert two == [[samples[0:2], samples[2:4]], [samples[4:6], samples[6:8]]]
    assert Shard(8, 2, 1, 2).microbatches == 2

"""Which rows a step reads: a function of the samples consumed, split over data-parallel ranks
without gaps or overlaps, a fresh permutation per epoch."""

from __future__ import annotations

from nam_trainer.train.batches import Shard, TrainOrder


def test_order_is_a_seeded_permutation_per_epoch() -> None:
    order = TrainOrder([10], [1.0], seed=3)
    first, second = order.global_batch(0, 10), order.global_batch(10, 10)
    assert sorted(first) == sorted(second) == [(0, r) for r in range(10)] and first != second
    assert TrainOrder([10], [1.0], seed=3).global_batch(7, 6) == first[7:] + second[:3]  # resumable anywhere
    assert TrainOrder([10], [1.0], seed=4).global_batch(0, 10) != first


def test_two_sources_are_sampled_by_weight_whatever_their_sizes() -> None:
    order = TrainOrder([7, 500], [3.0, 1.0], seed=0)
    samples = order.global_batch(0, 4000)
    share = sum(s == 0 for s, _ in samples) / len(samples)
    assert abs(share - 0.75) < 0.001  # megatron's greedy blending keeps every prefix within a sample
    small = [r for s, r in samples if s == 0]
    assert sorted(small[:7]) == list(range(7)) and sorted(small[7:14]) == list(range(7))  # epochs of its own
    assert TrainOrder([7, 500], [3.0, 1.0], seed=0).global_batch(1234, 50) == samples[1234:1284]


def test_data_parallel_ranks_split_the_global_batch() -> None:
    samples = TrainOrder([50], [1.0], seed=0).global_batch(12, 8)
    one = Shard(global_batch=8, micro_batch=2, dp_rank=0, dp_size=1).rows(samples)
    assert one == [samples[0:2], samples[2:4], samples[4:6], samples[6:8]]
    two = [Shard(8, 2, rank, 2).rows(samples) for rank in range(2)]
    assert two == [[samples[0:2], samples[2:4]], [samples[4:6], samples[6:8]]]
    assert Shard(8, 2, 1, 2).microbatches == 2

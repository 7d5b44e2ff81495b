"""The n-gram hash: golden vector, formula, padding, determinism, bucket distribution."""

from __future__ import annotations

import inspect
import json
import math
import re
import subprocess
import sys
import typing

import pytest
import torch

from nam_embed.hashing import PAD_ID, ROW_MULTIPLE, NgramHashConfig, primes_from
from nam_embed.ngram import NgramHashEmbedding

SMALL = NgramHashConfig(orders=(2, 3), heads=2, table_size=1000, dim=4, seed=0)


def _python_hash(tokens: list[int], t: int, multipliers: list[int], salt: int, prime: int, n: int) -> int:
    """The issue's formula on Python integers (arbitrary precision, % is non-negative)."""
    h = 0
    for p in range(n):
        h ^= tokens[t - p] * multipliers[p]
    return (h ^ salt) % prime


def test_golden_vector() -> None:
    # Pinned: changing any of these numbers changes every trained model's hash tables.
    assert SMALL.primes() == [1009, 1013, 1019, 1021]
    multipliers, salts = SMALL.multipliers_and_salts()
    assert multipliers == [
        [1813382119, 827307999, 0],
        [1911784257, 903170603, 0],
        [556019485, 2073320061, 1097954097],
        [869589437, 1971893209, 1683194653],
    ]
    assert salts == [1627694678, 86939546, 1043521778, 1782095536]
    module = NgramHashEmbedding(SMALL, 8)
    got = module.indices(torch.tensor([[5, 7, 11, 13, 17, 19]])).tolist()
    assert got == [
        [
            [-1, -1, -1, -1],
            [959, 383, -1, -1],
            [430, 785, 52, 1011],
            [106, 349, 728, 732],
            [443, 197, 447, 644],
            [219, 426, 158, 891],
        ]
    ]


def test_matches_formula_on_extreme_and_negative_ids() -> None:
    module = NgramHashEmbedding(SMALL, 8)
    tokens = [0, 1, 2**31 - 1, 2**32 - 1, 65535, -3, 7, 7, 7, 123456789]
    got = module.indices(torch.tensor([tokens]))[0]
    multipliers, salts = SMALL.multipliers_and_salts()
    for j, (n, prime) in enumerate(zip(SMALL.table_orders(), SMALL.primes(), strict=True)):
        for t in range(len(tokens)):
            want = PAD_ID if t < n - 1 else _python_hash(tokens, t, multipliers[j], salts[j], prime, n)
            assert int(got[t, j]) == want, (j, t)
            assert want == PAD_ID or 0 <= want < prime


def test_multipliers_odd_distinct_per_offset_and_below_2_31() -> None:
    cfg = NgramHashConfig(orders=(2, 3, 4), heads=8)
    multipliers, salts = cfg.multipliers_and_salts()
    for n, row in zip(cfg.table_orders(), multipliers, strict=True):
        used = row[:n]
        assert all(m % 2 == 1 and 0 < m < 2**31 for m in used)
        assert len(set(used)) == n
        assert row[n:] == [0] * (cfg.max_order - n)
    assert all(0 <= s < 2**31 for s in salts)


def test_order_of_tokens_matters() -> None:
    # With one multiplier per table, (a, b) and (b, a) would always share a bucket.
    module = NgramHashEmbedding(NgramHashConfig(orders=(2,), heads=4, table_size=100_000, dim=2), 4)
    gen = torch.Generator().manual_seed(1)
    pairs = torch.randint(0, 65536, (2000, 2), generator=gen)
    forward = module.indices(pairs)[:, 1]
    backward = module.indices(pairs.flip(-1))[:, 1]
    same = (forward == backward) & (pairs[:, 0:1] != pairs[:, 1:2])
    assert int(same.sum()) <= 2  # expected about 2000 * 4 / 1e5 = 0.08


def test_primes_distinct_and_rows_padded() -> None:
    cfg = NgramHashConfig()
    primes = cfg.primes()
    assert len(set(primes)) == cfg.num_tables == 16
    assert primes[0] == 500_009 and all(p >= 500_000 for p in primes)
    assert all(all(p % f for f in range(2, math.isqrt(p) + 1)) for p in primes)
    assert primes_from(2, 5) == [2, 3, 5, 7, 11]
    assert cfg.rows % ROW_MULTIPLE == 0 and 0 <= cfg.rows - sum(primes) < ROW_MULTIPLE
    assert cfg.offsets()[1] == primes[0]


def test_padding_at_row_and_document_starts() -> None:
    module = NgramHashEmbedding(SMALL, 8)
    ids = torch.arange(10, 22).reshape(1, 12)
    # Two documents packed in one row, the second starting at column 5; a third row starts
    # mid-document (positions 7, 8, ... at the row start).
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    idx = module.indices(ids, positions)[0]
    orders = SMALL.table_orders()
    for j, n in enumerate(orders):
        padded = [t for t in range(12) if int(idx[t, j]) == PAD_ID]
        assert padded == [t for t in range(12) if positions[0, t] < n - 1]
    mid = module.indices(ids, torch.arange(7, 19).reshape(1, 12))[0]
    assert (mid[0] == PAD_ID).all() and (mid[1, :2] != PAD_ID).all() and (mid[1, 2:] == PAD_ID).all()
    # A full n-gram hashes only its own tokens: the same trigram in another document, same bucket.
    assert torch.equal(idx[4], module.indices(ids[:, 2:5])[0, 2])
    # Padding positions look up zero.
    vec = module.lookup(ids, positions)[0].reshape(12, 4, 4)
    assert (vec[0] == 0).all() and (vec[5] == 0).all() and (vec[6, 2:] == 0).all()
    assert (vec[6, :2] != 0).all()


def test_position_ids_broadcast_and_checked() -> None:
    module = NgramHashEmbedding(SMALL, 8)
    ids = torch.randint(0, 100, (3, 7))
    shared = module.indices(ids, torch.arange(7).reshape(1, 7))
    assert torch.equal(shared, module.indices(ids))
    with pytest.raises(ValueError, match=r"position_ids \(1, 6\) do not match input_ids \(3, 7\)"):
        module(ids, torch.arange(6).reshape(1, 6))
    with pytest.raises(TypeError, match="input_ids must be integer"):
        module(ids.float())


def test_config_errors_name_field() -> None:
    with pytest.raises(ValueError, match=r"orders=\(2, 2\).*distinct"):
        NgramHashConfig(orders=(2, 2))
    with pytest.raises(ValueError, match=r"orders=\(\).*non-empty"):
        NgramHashConfig(orders=())
    with pytest.raises(ValueError, match=r"heads=0: need an int >= 1"):
        NgramHashConfig(heads=0)
    with pytest.raises(ValueError, match=r"row_range=\(0, 0\)"):
        NgramHashEmbedding(SMALL, 8, row_range=(0, 0))


_CHILD = """
import json, sys, torch
from nam_embed.hashing import NgramHashConfig
from nam_embed.ngram import NgramHashEmbedding
m = NgramHashEmbedding(NgramHashConfig(orders=(2, 3), heads=3, table_size=5000, dim=2, seed=7), 4)
ids = torch.tensor(json.loads(sys.argv[1]))
print(json.dumps({"idx": m.indices(ids).tolist(), "w": m.weight[:50].tolist()}))
"""


def test_deterministic_across_processes() -> None:
    ids = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
    runs = []
    for hashseed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(ids)],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": hashseed, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        )
        runs.append(json.loads(out.stdout))
    assert runs[0] == runs[1]
    here = NgramHashEmbedding(NgramHashConfig(orders=(2, 3), heads=3, table_size=5000, dim=2, seed=7), 4)
    assert here.indices(torch.tensor(ids)).tolist() == runs[0]["idx"]
    assert torch.equal(here.weight[:50], torch.tensor(runs[0]["w"]))


def _word_stream() -> list[int]:
    """A real token stream: the words and symbols of a few standard-library modules, ids in
    order of first appearance (Zipf-distributed like a tokenizer's output)."""
    text = "".join(inspect.getsource(m) for m in (typing, inspect, json.decoder, subprocess))
    vocab: dict[str, int] = {}
    return [vocab.setdefault(w, len(vocab)) for w in re.findall(r"\w+|[^\w\s]", text)]


def test_buckets_spread_like_a_random_function_on_real_text() -> None:
    tokens = torch.tensor([_word_stream()])
    cfg = NgramHashConfig(orders=(2, 3), heads=2, table_size=20_000, dim=2, seed=3)
    idx = NgramHashEmbedding(cfg, 2).indices(tokens)[0]
    for j, (n, prime) in enumerate(zip(cfg.table_orders(), cfg.primes(), strict=True)):
        grams = {
            tuple(tokens[0, t - n + 1 : t + 1].tolist()): int(idx[t, j]) for t in range(n - 1, idx.shape[0])
        }
        k = len(grams)
        occupied = len(set(grams.values()))
        # Balls into bins: a random function fills P (1 - (1 - 1/P)^k) buckets, std below sqrt of that.
        expected = prime * (1 - (1 - 1 / prime) ** k)
        assert k > 5000
        assert abs(occupied - expected) < 5 * math.sqrt(expected), (j, k, occupied, expected)
        # Spread over the whole range: 16 equal slices each hold 1/16 of the distinct n-grams.
        slices = torch.bincount(torch.tensor(list(grams.values())) * 16 // prime, minlength=16).float()
        chi2 = float(((slices - k / 16) ** 2 / (k / 16)).sum())
        assert chi2 < 45, (j, chi2)  # 15 degrees of freedom: p < 1e-4 above 45
